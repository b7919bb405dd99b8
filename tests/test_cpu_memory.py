"""methods/cpu_memory.py: glibc keeps freed memory for the next training step instead of page-faulting it anew."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from mitobench.methods.cpu_memory import keep_freed_memory

SIZE = 96 * 2**20 // 4  # float32 elements of a 96 MiB tensor, far above glibc's 32 MiB mmap threshold


def _faults_to_allocate_twice() -> int:
    """Minor page faults taken by the second of two same-sized allocations, each written in full."""
    first = torch.ones(SIZE)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(SIZE)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_instead_of_page_faulted():
    assert keep_freed_memory(False)
    fresh = _faults_to_allocate_twice()  # glibc's default: a new mmap, every page faulted in again
    try:
        assert keep_freed_memory(True)
        # the heap grows for a few rounds until a freed block fits the next request (a training run's first steps),
        # then the same memory serves every round
        rounds = [_faults_to_allocate_twice() for _ in range(8)]
    finally:
        keep_freed_memory(False)
    assert fresh > 0 and rounds[-1] * 4 < fresh and rounds[-2] * 4 < fresh, (fresh, rounds)
