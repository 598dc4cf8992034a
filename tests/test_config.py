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
