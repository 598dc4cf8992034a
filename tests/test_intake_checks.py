"""The intake checks in process: limits are configurable, the decode gate bounds concurrency, bombs stop early.

The network suite (test_hostile_intake.py) shows the statuses a sender sees;
these tests pin down the mechanisms behind them without a node process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from hostile_corpus import base_dataset, make_syntaxes, part10
from pydicom.encaps import generate_frames

from dicom_node.config import LimitsConfig, parse_config
from dicom_node.dicom import frames, validation
from dicom_node.dicom.validation import MISMATCH, OVER_LIMIT, UNDECODABLE, DecodeGate, validate_instance


def _file(tmp_path: Path, ds, name: str = "x.dcm", **kw) -> Path:
    path = tmp_path / name
    path.write_bytes(part10(ds, **kw))
    return path


def test_limits_come_from_the_config_and_apply():
    cfg = parse_config({"limits": {"max_frame_pixels": 1000, "decode_concurrency": 3}})
    assert cfg.limits.max_frame_pixels == 1000 and cfg.limits.decode_concurrency == 3
    with pytest.raises(ValueError, match="decode_concurrency"):
        parse_config({"limits": {"decode_concurrency": 0}})


def test_a_frame_over_the_configured_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    ds = base_dataset()  # 64 x 64
    path = _file(tmp_path, ds)
    decoded = []
    monkeypatch.setattr(validation, "_decode_all", lambda *a: decoded.append(a))
    small = DecodeGate(LimitsConfig(max_frame_pixels=64 * 63))
    problem = validate_instance(path, ds.SOPClassUID, ds.SOPInstanceUID, small)
    assert problem is not None and problem.kind == OVER_LIMIT and "max_frame_pixels" in problem.reason
    assert decoded == []  # refused before any decoder ran
    assert validate_instance(path, ds.SOPClassUID, ds.SOPInstanceUID, DecodeGate(LimitsConfig())) is None
    assert len(decoded) == 1


def test_every_frame_is_decoded(tmp_path):
    ds = base_dataset()
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    path = _file(tmp_path, ds)
    assert validate_instance(path, ds.SOPClassUID, ds.SOPInstanceUID) is None
    ds.NumberOfFrames = 4  # the pixel data hold three
    problem = validate_instance(_file(tmp_path, ds, "four.dcm"), ds.SOPClassUID, ds.SOPInstanceUID)
    assert problem is not None and problem.kind == UNDECODABLE


def test_image_without_pixel_data_is_refused(tmp_path):
    ds = base_dataset()
    del ds.PixelData
    problem = validate_instance(_file(tmp_path, ds), ds.SOPClassUID, ds.SOPInstanceUID)
    assert problem is not None and problem.kind == MISMATCH and "Pixel Data" in problem.reason


def test_the_gate_lets_decode_concurrency_decodes_run_at_once():
    gate = DecodeGate(LimitsConfig(decode_concurrency=2, decode_wait_s=5))
    running, peak, lock = 0, 0, threading.Lock()

    names = set()

    def decode():
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running -= 1

    threads = [threading.Thread(target=gate.run, args=(decode,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == 2
    assert len(names) == 2  # the same two decode threads, whichever association asked

def test_a_busy_gate_refuses_with_over_limit_after_the_wait():
    gate = DecodeGate(LimitsConfig(decode_concurrency=1, decode_wait_s=0.1))
    started = threading.Event()
    busy = threading.Thread(target=gate.run, args=(lambda: (started.set(), time.sleep(1.0)),))
    busy.start()
    started.wait(5)
    with pytest.raises(Exception) as info:
        gate.run(lambda: None)
    busy.join()
    assert info.value.problem.kind == OVER_LIMIT  # type: ignore[attr-defined] - the private refusal type carries the problem


def test_a_deflate_bomb_stops_at_the_limit_and_leaves_nothing(tmp_path):
    from hostile_corpus import _deflate_cases

    sx = make_syntaxes(tmp_path / "sx")[0]
    bomb = next(c for c in _deflate_cases(sx) if c.category == "deflate-bomb")
    path = bomb.write(tmp_path)
    t0 = time.monotonic()
    gate = DecodeGate(LimitsConfig(max_inflated_bytes=4 << 20))
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    problem = validate_instance(path, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, gate)
    assert problem is not None and problem.kind == OVER_LIMIT and "max_inflated_bytes" in problem.reason
    assert time.monotonic() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sx", path.name])  # the inflated copy is gone


def test_frame_headers_are_read_from_the_streams(tmp_path):
    by_key = {sx.key: sx for sx in make_syntaxes(tmp_path)}
    for key in ("jpeg-baseline", "jpeg-lossless", "jpeg-ls"):
        frame = next(generate_frames(by_key[key].ds.PixelData, number_of_frames=1))
        h = frames.jpeg_header(frames.Stream(frame))
        assert (h.rows, h.columns, h.components) == (64, 64, 1), key
        with pytest.raises(frames.FrameError, match="end marker"):
            frames.jpeg_header(frames.Stream(frame[: len(frame) // 3]))
    frame = next(generate_frames(by_key["j2k-lossless"].ds.PixelData, number_of_frames=1))
    h = frames.j2k_header(frames.Stream(frame))
    assert (h.rows, h.columns, h.components) == (64, 64, 1)
    with pytest.raises(frames.FrameError):
        frames.j2k_header(frames.Stream(frame[: len(frame) // 2]))
