"""Keep freed memory in the process while training on the CPU (Linux, glibc).

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the kernel on ``free``, so
each training step page-faults and zero-fills its large activations again (a 224 px EfficientNet-Lite0 batch
of 32 has several of 40-80 MiB). Told to use its heap for every size and to keep what is freed, it reuses the
same memory step after step: 1.1-1.3x the training images/s on this project's 2-core CPU
(benchmarks/bench_train_speed.py). The cost is that the process keeps its peak memory until it exits, as
jemalloc or tcmalloc would, which PyTorch's CPU tuning guide suggests for the same reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only: musl, macOS and Windows lack it)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc reuse freed memory (``enable``) or restore its defaults; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    mmap_max, trim = (0, 2**30) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
