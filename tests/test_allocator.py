"""fusion.allocator: large freed blocks are reused instead of faulted in again (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusion.allocator import _libc

_PROBE = """
import resource, sys, threading
import torch
if sys.argv[1] == "1":
    from fusion.allocator import keep_freed_memory
    assert keep_freed_memory()
out = {}
def run():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = torch.ones(16 << 20)  # 64 MB float32, touched: what a VGG layer output does
        del a
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
t = threading.Thread(target=run); t.start(); t.join()
print(out["faults"])
"""


def _faults(tuned: bool) -> int:
    res = subprocess.run([sys.executable, "-c", _PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True)
    return int(res.stdout.strip())


@pytest.mark.skipif(_libc() is None, reason="needs glibc's mallopt")
def test_freed_large_blocks_are_reused_not_faulted_again():
    default, kept = _faults(False), _faults(True)
    pages = 20 * (64 << 20) // 4096
    assert default > 0.8 * pages  # glibc default: every 64 MB block is mmapped and faulted in again
    # kept in the heap: mostly reused (measured 2.5x fewer in a thread, 5x in the main thread;
    # on the VGG stage 7.4 M -> 1.5 M faults and 30 s -> 7 s of system time, docs/speed-vgg.md)
    assert kept < 0.5 * default
