"""The CPU settings a training process applies to itself (train/cpu_runtime.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medclipin.config import load_config


def test_the_training_configs_keep_freed_memory_by_default():
    assert load_config("demo").train.retain_freed_memory is True


_IN_HEAP = (
    "import sys, torch\n"
    "from medclipin.train.cpu_runtime import configure_cpu\n"
    "configure_cpu(1, sys.argv[1] == 'retain', torch.device('cpu'))\n"
    "block = torch.ones(16 * 2**20)\n"
    "heap = [line.split()[0].split('-') for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]')]\n"
    "print(any(int(lo, 16) <= block.data_ptr() < int(hi, 16) for lo, hi in heap))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_large_block_comes_from_the_kept_heap_only_when_freed_memory_is_retained():
    """glibc maps a 64 MB tensor on its own (and unmaps it when freed, so the next one is page-faulted in
    again); with freed memory retained it is carved from the heap, which is never trimmed."""
    def in_heap(mode: str) -> bool:
        out = subprocess.run([sys.executable, "-c", _IN_HEAP, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    assert in_heap("retain") and not in_heap("default")


def test_a_gpu_run_leaves_the_allocator_alone(monkeypatch):
    from medclipin.train import cpu_runtime

    called = []
    monkeypatch.setattr(cpu_runtime, "retain_freed_memory", lambda: called.append(1) or True)
    cpu_runtime.configure_cpu(0, True, torch.device("cuda"))
    cpu_runtime.configure_cpu(0, False, torch.device("cpu"))
    assert not called
    cpu_runtime.configure_cpu(0, True, torch.device("cpu"))
    assert called == [1]
