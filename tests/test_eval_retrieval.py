"""Retrieval: ranks with identical reports as matches, chunk invariance, top-k, and bounded memory at 20k × 20k."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from medclipin.eval.retrieval import ranks, retrieval_metrics, text_groups, top_k


def _normalised(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)


def test_perfect_pairs_and_identical_reports_count_as_matches():
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 2, 3]]
    result = retrieval_metrics(images, texts, ["a", "b", "c", "d"])
    assert result["image_to_text"]["R@1"] == 1.0 and result["text_to_image"]["median_rank"] == 1.0
    # image 0's report is identical to report 3 and the model prefers report 3: still a hit
    swapped = torch.eye(4)[[3, 1, 2, 0]]
    result = retrieval_metrics(images, swapped, ["No acute process.", "b", "c", "no acute  process."])
    assert result["image_to_text"]["R@1"] == 1.0 and result["unique_texts"] == 3
    strict = retrieval_metrics(images, swapped, None)
    assert strict["image_to_text"]["R@1"] == 0.5


def test_chunking_does_not_change_ranks():
    queries, candidates = _normalised(300, 16, 0), _normalised(300, 16, 1)
    groups = text_groups([str(i % 250) for i in range(300)])
    full = ranks(queries, candidates, groups, groups, chunk_size=300)
    assert torch.equal(full, ranks(queries, candidates, groups, groups, chunk_size=7))
    # brute force for one query
    sims = queries[0] @ candidates.T
    best = sims[groups == groups[0]].max()
    assert full[0] == int((sims > best).sum()) + 1


def test_top_k_matches_brute_force_across_chunks():
    queries, candidates = _normalised(3, 8, 2), _normalised(1000, 8, 3)
    scores, index = top_k(queries, candidates, k=5, chunk_size=64)
    expected_scores, expected_index = (queries @ candidates.T).topk(5, dim=1)
    assert torch.equal(index, expected_index) and torch.allclose(scores, expected_scores)
    assert top_k(queries, candidates[:3], k=5)[1].shape == (3, 3)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from medclipin.eval.retrieval import retrieval_metrics

    def status(field):  # a /proc/self/status field in bytes
        with open("/proc/self/status") as handle:
            return next(int(l.split()[1]) * 1024 for l in handle if l.startswith(field + ":"))

    def reset_peak():  # Linux >= 4.0: VmHWM := the current resident set
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    n, d = int(sys.argv[1]), 64
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.5 * torch.randn(n, d), dim=-1)
    retrieval_metrics(images[:600], texts[:600], None, chunk_size=128)  # page in the code first
    reset_peak()
    before, file_before = status("VmRSS"), status("RssFile")
    start = time.perf_counter()
    result = retrieval_metrics(images, texts, None)
    seconds = time.perf_counter() - start
    extra = status("VmHWM") - before
    file_growth = status("RssFile") - file_before
    control = None
    if sys.argv[2] == "control":  # the same measurement must see a 400 MB tensor
        reset_peak()
        before = status("VmRSS")
        block = torch.ones(100_000_000)
        control = status("VmHWM") - before
    print(json.dumps({"extra": extra, "file_growth": file_growth, "control": control,
                      "seconds": seconds, "r1": result["image_to_text"]["R@1"]}))
""")



def _run_memory(n, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), mode], capture_output=True, text=True,
                         env=env, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_retrieval_memory_stays_far_below_the_full_similarity_matrix():
    """20k × 20k: the full fp32 similarity matrix is 1.6 GB; chunked ranks must stay well below it.

    Method: a fresh subprocess (so other tests' allocations cannot mask the peak) resets its peak
    resident set (VmHWM, via /proc/self/clear_refs) right before the call and reads it after;
    VmHWM − VmRSS_before is an upper bound of the memory the call added, whatever allocator torch uses
    (tracemalloc would not see torch's buffers). Not getrusage's ru_maxrss: a child started from a
    large process (pytest after the DDP tests) inherits the parent's resident set in it, which made
    this test fail in CI. A small warm-up call first pages in the code (library pages count too). A
    400 MB control allocation checks that the measurement sees torch allocations at all.
    """
    n = 20_000
    full_matrix = n * n * 4
    measured = _run_memory(n, "control")
    assert measured["control"] >= 390e6  # the measurement sees a 400 MB torch tensor
    assert measured["extra"] < 0.2 * full_matrix, (
        f"peak extra {measured['extra'] / 1e6:.0f} MB, of which file-backed {measured['file_growth'] / 1e6:.0f} MB")
    assert 0.0 <= measured["r1"] <= 1.0
