import os
import subprocess
import sys

import pytest
import torch

from contrastive_lw.accel.memory import KEEP_FREED_MEMORY_ENV, _on_glibc, keep_freed_memory, on_huge_pages

# Allocates, fills and frees a 40 MB tensor again and again (a step's tensors, past glibc's 32 MB
# cap on its own mmap threshold); prints the median share of its pages faulted in per cycle once
# warm (the median, so that one cycle disturbed by the machine, as seen once in CI, does not decide).
FAULTED_SHARE = """
import resource, statistics, torch
from contrastive_lw import keep_freed_memory
keep_freed_memory()
for _ in range(10):
    torch.ones(10 << 20)
shares = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(10 << 20)
    shares.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (40 << 20 >> 12))
print(statistics.median(shares))
"""


def _faulted_share(keep: bool) -> float:
    env = {**os.environ, KEEP_FREED_MEMORY_ENV: "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", FAULTED_SHARE], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not _on_glibc(), reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    default = _faulted_share(keep=False)
    if default < 0.5:
        pytest.skip(f"this C library reuses the memory by itself ({default:.0%} of the pages faulted in)")
    assert _faulted_share(keep=True) < 0.05


def test_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(KEEP_FREED_MEMORY_ENV, "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv(KEEP_FREED_MEMORY_ENV)
    assert keep_freed_memory() is _on_glibc()


def test_the_command_line_keeps_freed_memory(monkeypatch):
    from contrastive_lw import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["visualize", "/nonexistent"]) == 2
    assert calls == [True]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_on_huge_pages_copies_a_large_tensor_with_its_strides(layout):
    frames = torch.randint(0, 256, (1400, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=layout)
    copy = on_huge_pages(frames)
    if sys.platform.startswith("linux"):
        assert copy.data_ptr() != frames.data_ptr()  # its own mapping
    assert torch.equal(copy, frames) and copy.stride() == frames.stride()


def test_on_huge_pages_leaves_small_and_strided_tensors_alone():
    small = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    strided = torch.zeros(2400, 3, 32, 32, dtype=torch.uint8)[::2]
    assert on_huge_pages(small) is small and on_huge_pages(strided) is strided
