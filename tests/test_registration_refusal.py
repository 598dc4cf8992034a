"""A pair that cannot be registered never becomes a silent fusion: the node end to end.

The generated CT of a head phantom is sent with an "MR" series of the same
patient and study whose voxels show something else entirely (smooth random
blobs: a wrong series picked at the scanner).  Through the real node (DCMTK
storescu -> SCP -> pairing -> job): with ``on_poor_quality = "fail"`` the job
fails naming the figures and nothing reaches the outbox; with ``"warn"`` the
fusion is made and its Series Description starts with ``CHECK REG:``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import dcmtk, free_port


def _unrelated_mr(mr_dir: Path, seed: int = 3) -> None:
    """Overwrite the MR series' voxels (headers untouched) with smooth blobs that share no anatomy with the CT."""
    files = sorted(mr_dir.iterdir())
    first = pydicom.dcmread(files[0])
    rows, cols, nz = int(first.Rows), int(first.Columns), len(files)
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(rows), np.arange(cols), indexing="ij")
    p = np.stack([i / cols, j / rows, k / nz], -1) - 0.5
    v = np.zeros((nz, rows, cols))
    for _ in range(10):
        c, s = rng.uniform(-0.4, 0.4, 3), rng.uniform(0.05, 0.2)
        v += rng.uniform(200, 900) * np.exp(-np.sum((p - c) ** 2, -1) / (2 * s * s))
    v += rng.normal(0, 20, v.shape)
    for f in files:
        ds = pydicom.dcmread(f)
        z = int(ds.InstanceNumber) - 1
        ds.PixelData = np.clip(v[z], 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(f, enforce_file_format=True)


def _settings(tmp_path: Path, policy: str):
    from dicom_node.config import parse_config

    return parse_config({
        "device": "cpu",
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": 0},
        "storage": {"root": str(tmp_path / f"node-{policy}")},
        "settle": {"quiet_seconds": 2, "sweep_interval_s": 0.5},
        # nobody listens there: whatever is queued stays in the outbox, where the test can see it
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        "pipelines": [{"name": "ct-mr", "match": "study", "destinations": ["pacs"], "feature_source": "image",
                       "base": {"modality": ["CT"], "min_instances": 10},
                       "overlay": {"modality": ["MR"], "min_instances": 10},
                       "registration": {"on_poor_quality": policy}}],
    })


def _send_and_wait(node, folders, timeout_s: float = 240.0):
    cmd = [dcmtk("storescu"), "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd", "127.0.0.1", str(node.port),
           *map(str, folders)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = node.jobs.list()
        if jobs and jobs[0].state in ("failed", "done"):
            return jobs[0]
        time.sleep(0.5)
    pytest.fail(f"no job finished within {timeout_s} s: {node.jobs.counts()}")


@pytest.fixture(scope="module")
def unrelated_pair(tmp_path_factory):
    from fusion_demo.samples import write_synthetic_pair

    ct_dir, mr_dir = write_synthetic_pair(tmp_path_factory.mktemp("input"))
    _unrelated_mr(mr_dir)
    return ct_dir, mr_dir


@pytest.mark.slow
def test_unrelated_pair_fails_the_job_and_sends_nothing(tmp_path, unrelated_pair):
    from dicom_node.workflow.node import Node

    node = Node(_settings(tmp_path, "fail")).start()
    try:
        job = _send_and_wait(node, unrelated_pair)
        assert job.state == "failed"
        assert job.error.startswith("registration rejected, nothing was sent:"), job.error
        assert "on_poor_quality" in job.error
        quality = job.result["registration_quality"]  # the figures stay on the failed job for the operator
        assert quality["ok"] is False and quality["problems"]
        picture = Path(job.result["registration_picture"])  # and the picture to look at, named in the error
        assert picture.is_file() and str(picture) in job.error
        from PIL import Image

        with Image.open(picture) as img:
            assert img.width > 500 and img.height > 300
        assert sum(sum(states.values()) for states in node.outbox.summary().values()) == 0
        assert node.store.list_series(origin="derived") == []
    finally:
        node.stop()


@pytest.mark.slow
def test_unrelated_pair_with_warn_policy_is_marked(tmp_path, unrelated_pair):
    from dicom_node.workflow.node import Node

    node = Node(_settings(tmp_path, "warn")).start()
    try:
        job = _send_and_wait(node, unrelated_pair)
        assert job.state == "done", job.error
        assert job.result["registration_warning"]
        derived = node.store.list_series(origin="derived")
        sc = [s for s in derived if s.modality != "REG"]
        assert sc and all(s.series_description.startswith("CHECK REG: ") for s in sc)
        print("\nwarned series:", [s.series_description for s in sc], job.result["registration_quality"]["problems"])
    finally:
        node.stop()
