"""How a training process uses the CPU it runs on: intra-op threads and the C allocator's handling of freed memory.

glibc's malloc serves every block above 32 MB (the ceiling of its adaptive mmap threshold) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A CNN step at a few hundred pixels allocates and frees
tens of such activation tensors (32 x 96 x 80 x 80 fp32 = 79 MB for EfficientNet's first stage at 160 px),
so every step pays the kernel's page faults to zero them again: a fresh 80 MB tensor costs 5x the fill of a
reused one. Telling malloc never to use mmap (``M_MMAP_MAX = 0``) and never to trim the heap
(``M_TRIM_THRESHOLD``) carves those blocks from the heap, whose freed pages stay mapped for the next step's
tensors (what preloading tcmalloc gives, without a system library). The price: the process keeps its
high-water heap until it exits, somewhat above the peak, as freed blocks do not always fit the next request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_retaining = False


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (no mmap per large block, no heap trimming).

    Returns True when the setting took effect (Linux with glibc), False elsewhere (the allocator is left as
    it is). Process-wide and idempotent."""
    global _retaining
    if _retaining:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _retaining = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _retaining


def configure_cpu(threads: int, retain_memory: bool, device: torch.device) -> None:
    """``train.threads`` (torch intra-op threads; 0 = torch's default) and ``train.retain_freed_memory``
    (:func:`retain_freed_memory`, CPU runs only) for this process."""
    if threads > 0:
        torch.set_num_threads(threads)
    if retain_memory and device.type == "cpu" and not retain_freed_memory():
        log.debug("train.retain_freed_memory: this C library has no mallopt; the allocator is unchanged")
