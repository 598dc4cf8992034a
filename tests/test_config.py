"""The node's configuration: the example parses, mistakes are named with their key."""

from __future__ import annotations

import pytest

from dicom_node.cli import main
from dicom_node.config import ConfigError, load_config, parse_config


def _pipeline(**kw):
    base = {"name": "p", "base": {"modality": ["CT"]}, "overlay": {"modality": ["MR"]}}
    base.update(kw)
    return base


def test_init_config_writes_a_valid_example(tmp_path):
    path = tmp_path / "node.toml"
    assert main(["init-config", str(path)]) == 0
    cfg = load_config(path)
    assert cfg.node.ae_title == "FUSIONNODE" and cfg.pipelines[0].destinations == ["pacs"]
    assert cfg.storage.root == tmp_path / "fusion-node-data"  # relative to the file
    assert main(["init-config", str(path)]) == 2  # refuses to overwrite


@pytest.mark.parametrize("raw, fragment", [
    ({"node": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, "node.ae_title"),
    ({"node": {"port": 70000}}, "node.port"),
    ({"pipelines": [_pipeline(destinations=["nowhere"])]}, "unknown destination 'nowhere'"),
    ({"pipelines": [_pipeline(trio=["adf", "nope"])]}, "unknown fusion method"),
    ({"pipelines": [_pipeline(match="sometimes")]}, "pipelines.0.match"),
    ({"pipelines": [_pipeline(overlay={"modality": ["MR"], "description": "([unclosed"})]}, "regular expression"),
    ({"uid_root": "1.2.abc."}, "uid_root"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_mistakes_are_named(raw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        parse_config(raw)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="init-config"):
        load_config(tmp_path / "absent.toml")


def test_trio_defaults_per_modality():
    from fusion.api import default_trio

    cfg = parse_config({"pipelines": [_pipeline()]})
    assert cfg.pipelines[0].trio == []
    assert default_trio("CT") == ("cbf", "tif", "wls") and default_trio("NM") == ("adf", "cbf", "tif")
    assert len(default_trio("PT")) == 3 and default_trio("XA") == default_trio("CT")


# -- the example config is the defaults, written out -------------------------------------------


def _leaves(value, prefix=""):
    """``{dotted.key: value}`` of a TOML document; list items of tables are indexed."""
    out = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}{k}."))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            out.update(_leaves(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = value
    return out


def _model_for(key: str):
    """The pydantic model and field a dotted example key belongs to."""
    from dicom_node import config as C

    model = C.NodeSettings
    parts = key.split(".")
    for _i, part in enumerate(parts[:-1]):
        if part.isdigit():
            continue
        annotation = model.model_fields[part].annotation
        args = getattr(annotation, "__args__", ())
        nested = [a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, C.BaseModel)]
        if part == "destinations":
            nested = [C.DicomDestination]
        model = nested[0]
    return model, parts[-1]


def test_example_config_shows_every_default_and_only_defaults():
    """EXAMPLE_TOML says "the value shown is the default": each shown value is its field's default,
    and every field of every section appears (a new key cannot go undocumented)."""
    import tomllib

    from pydantic_core import PydanticUndefined

    from dicom_node import config as C

    doc = tomllib.loads(C.EXAMPLE_TOML)
    shown = _leaves(doc)
    examples_only = {"name", "ae_title", "host", "port", "destinations", "modality"}  # required or example values
    for key, value in shown.items():
        model, field = _model_for(key)
        assert field in model.model_fields, f"example key {key} is not a config field"
        default = model.model_fields[field].default
        # required keys, and keys without a default (None cannot be written in TOML), show an example value
        if default is PydanticUndefined or default is None or (field in examples_only and key.split(".")[0] in ("destinations", "pipelines")):
            continue
        if isinstance(default, C.Path):
            default = str(default)
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        assert value == default, f"{key} = {value!r} in the example, but the default is {default!r}"
    for section, model in [("node", C.NodeConfig), ("storage", C.StorageConfig), ("settle", C.SettleConfig),
                           ("outbox", C.OutboxConfig), ("query_retrieve", C.QueryRetrieveConfig), ("retention", C.RetentionConfig),
                           ("limits", C.LimitsConfig), ("executor", C.ExecutorConfig),
                           ("pipelines.0", C.Pipeline), ("pipelines.0.registration", C.RegistrationConfig),
                           ("pipelines.0.registration.quality", C.QualityConfig), ("node.tls", C.NodeTLS),
                           ("logging", C.LoggingConfig),
                           ("http", C.HttpConfig), ("notifications.0", C.Notification)]:
        documented = {k[len(section) + 1:].split(".")[0] for k in shown if k.startswith(section + ".")}
        commented = {line.lstrip("# ").split(" =")[0] for line in C.EXAMPLE_TOML.splitlines() if " = " in line}
        missing = [f for f in model.model_fields if f not in documented and f not in commented]
        assert not missing, f"[{section}] fields missing from the example config: {missing}"


def test_destination_kinds():
    from dicom_node.config import DicomDestination, DicomWebDestination

    cfg = parse_config({"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"name": "web", "kind": "dicomweb", "url": "https://pacs.example.org/dicom-web/", "token": "t"},
    ], "query_retrieve": {"move_destinations": ["pacs"]}})
    pacs, web = cfg.destinations
    assert isinstance(pacs, DicomDestination) and pacs.kind == "dicom"
    assert isinstance(web, DicomWebDestination) and web.url == "https://pacs.example.org/dicom-web"
    assert [d.name for d in cfg.dicom_destinations()] == ["pacs"]
    with pytest.raises(ConfigError, match="DICOMweb destination"):
        parse_config({"destinations": [{"name": "web", "kind": "dicomweb", "url": "http://x/dicom-web"}],
                      "query_retrieve": {"move_destinations": ["web"]}})
    with pytest.raises(ConfigError, match="http"):
        parse_config({"destinations": [{"name": "web", "kind": "dicomweb", "url": "ftp://x"}]})
    with pytest.raises(ConfigError, match="kind"):
        parse_config({"destinations": [{"name": "x", "kind": "smtp", "url": "http://x"}]})


def test_pipeline_method_is_any_registered_method():
    from fusion.methods import available

    assert parse_config({"pipelines": [_pipeline()]}).pipelines[0].method == "faithful"
    for name in available():
        assert parse_config({"pipelines": [_pipeline(method=name.upper())]}).pipelines[0].method == name
    with pytest.raises(ConfigError, match="unknown fusion method 'nope'"):
        parse_config({"pipelines": [_pipeline(method="nope")]})
