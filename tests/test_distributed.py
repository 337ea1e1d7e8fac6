"""Data parallelism on CPU: rank detection (torchrun, SLURM), and 2 gloo processes equal one process.

Relation checked (model level): with the global batch split across ranks, the losses' local-loss form
and DDP's gradient averaging give ``mean_r L_r = L`` and ``mean_r ∂L_r/∂θ = ∂L/∂θ`` where ``L`` is the
single-process loss on the whole batch. This holds for CLIP and SigLIP exactly. CLIPin's heads contain
BatchNorm, which normalises over each rank's own rows unless SyncBatchNorm is on — and torch's
SyncBatchNorm is GPU-only — so on CPU CLIPin is checked for what must hold anyway: identical gradients,
weights and EMA target on every rank.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medclipin.train.distributed import DistInfo, detect, init_distributed
from test_train_support import tiny_config, tiny_model_config

WORLD, LOCAL_B, VOCAB = 2, 4, 200
REPO = Path(__file__).resolve().parents[1]
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


# ------------------------------------------------------------------ rank detection
@pytest.fixture
def clean_env(monkeypatch):
    for name in (*RANK_VARS, "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_detect_single_process_by_default(clean_env):
    info = detect()
    assert info == DistInfo(rank=0, local_rank=0, world_size=1) and info.is_main and not info.enabled


def test_detect_reads_torchrun_variables(clean_env):
    clean_env.setenv("RANK", "5"), clean_env.setenv("WORLD_SIZE", "8"), clean_env.setenv("LOCAL_RANK", "1")
    info = detect()
    assert (info.rank, info.local_rank, info.world_size) == (5, 1, 8) and info.enabled and not info.is_main


def test_detect_reads_slurm_variables(clean_env):
    clean_env.setenv("SLURM_PROCID", "3"), clean_env.setenv("SLURM_NTASKS", "4"), clean_env.setenv("SLURM_LOCALID", "1")
    assert detect() == DistInfo(rank=3, local_rank=1, world_size=4)


def test_torchrun_variables_win_over_slurm(clean_env):
    # torchrun launched inside a SLURM allocation: torchrun's ranks are the ones that count
    clean_env.setenv("SLURM_PROCID", "0"), clean_env.setenv("SLURM_NTASKS", "1"), clean_env.setenv("SLURM_LOCALID", "0")
    clean_env.setenv("RANK", "2"), clean_env.setenv("WORLD_SIZE", "4"), clean_env.setenv("LOCAL_RANK", "2")
    assert detect() == DistInfo(rank=2, local_rank=2, world_size=4)


def test_several_processes_without_a_rendezvous_address_is_a_clear_error(clean_env):
    clean_env.setenv("SLURM_PROCID", "0"), clean_env.setenv("SLURM_NTASKS", "2"), clean_env.setenv("SLURM_LOCALID", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT not set"):
        init_distributed("cpu")


def test_single_process_needs_no_process_group(clean_env):
    assert init_distributed("cpu") == DistInfo()
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------ 2 gloo processes vs one
KINDS = {"clip": ("model.contrastive.kind=clip",), "siglip": ("model.contrastive.kind=siglip",), "clipin": ()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(11)
    n, length = WORLD * LOCAL_B, 12
    batch = {}
    for suffix in ("", "_2"):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[1, 8:] = 0
        mask[6, 5:] = 0
        batch["image" + suffix] = torch.randn(n, 1, 32, 32, generator=g)
        batch["input_ids" + suffix] = torch.randint(5, VOCAB, (n, length), generator=g) * mask
        batch["attention_mask" + suffix] = mask
    return batch


def _run_steps(kind: str, rank: int, world: int, steps: int) -> dict:
    """Build the tiny model and its objective (same weights everywhere), take `steps` SGD steps on this rank's rows."""
    from medclipin.config import TrainConfig
    from medclipin.models.model import MedClipModel
    from medclipin.train.objective import TrainingObjective
    from medclipin.train.optim import build_scheduler
    from medclipin.train.step import TrainStep

    cfg = tiny_model_config(*KINDS[kind], clipin=kind == "clipin")
    torch.manual_seed(0)
    model = TrainingObjective(MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                                       vocab_size=VOCAB), cfg.model)
    assert not model.has_unused_parameters
    module = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train = TrainConfig(steps=10, warmup_steps=0, grad_clip=0.0, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, fused=True)  # skips non-finite steps on the device
    step = TrainStep(model, module, optimizer, build_scheduler(optimizer, train),
                     torch.amp.GradScaler("cpu", enabled=False), train, "fp32", torch.device("cpu"),
                     DistInfo(rank=rank, local_rank=rank, world_size=world), ddp=world > 1)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B) if world > 1 else slice(None)
    local = {k: v[rows] for k, v in _global_batch().items()}
    result = {"losses": []}
    for index in range(steps):
        outcome = step(lambda: local, index)
        assert outcome.applied
        result["losses"].append(outcome.loss.item())  # the all-reduced mean: the global-batch loss
        if index == 0:  # gradients of the first step, after DDP's all-reduce (no clipping)
            result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "clipin":
        result["target"] = {n: p.detach().clone() for n, p in model.clipin.target.named_parameters()}
    return result


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save({kind: _run_steps(kind, rank, WORLD, steps=2) for kind in KINDS}, f"{out_dir}/rank{rank}.pt")
        # Both ranks finish their collectives before either tears gloo down: a rank that exits while
        # its peer still has work in flight can abort (SIGABRT, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for kind in KINDS:
        r0, r1 = ranks[0][kind], ranks[1][kind]
        # every rank holds the same all-reduced loss, gradients, weights (and EMA target)
        assert r0["losses"] == r1["losses"], kind
        for key in ("grads", "params", *(("target",) if kind == "clipin" else ())):
            assert r0[key].keys() == r1[key].keys()
            for name in r0[key]:
                assert torch.equal(r0[key][name], r1[key][name]), (kind, key, name)
        if kind == "clipin":
            assert len(r0["target"]) > 0
            continue  # per-rank BatchNorm statistics: not the single-process function (module docstring)
        single = _run_steps(kind, 0, 1, steps=2)
        assert r0["losses"] == pytest.approx(single["losses"], abs=1e-5), kind
        assert r0["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            assert torch.allclose(r0["grads"][name], grad, atol=1e-5, rtol=1e-4), (kind, name)
        for name, param in single["params"].items():
            assert torch.allclose(r0["params"][name], param, atol=1e-5, rtol=1e-4), (kind, name)


def _srun_pretrain(config_path: Path, run: Path) -> list[subprocess.Popen]:
    """`python -m medclipin pretrain` as WORLD srun-style tasks (SLURM_PROCID/NTASKS/LOCALID, gloo), started."""
    port, processes = _free_port(), []
    for rank in range(WORLD):
        # what srun gives each task (plus the rendezvous address the sbatch script exports)
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
        env.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(WORLD), "SLURM_LOCALID": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                    "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "medclipin", "pretrain", "--config", str(config_path), "--out", str(run),
             "--quiet", "--no-validate"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return processes


@pytest.mark.slow
def test_pretrain_command_on_two_processes_matches_one_process(tmp_path):
    """`python -m medclipin pretrain` as 2 srun-style tasks (SLURM_PROCID/NTASKS/LOCALID, gloo) vs one process, CLIP.

    DistributedSampler gives the two ranks perm[0::2] and perm[1::2] of the same epoch permutation, so
    each global batch holds the same samples (in another order) as the single process's batch; the
    contrastive loss does not depend on the order, so the logged losses agree.
    """
    cfg = tiny_config("train.steps=3", "train.checkpoint_every=2", clipin=False)
    single = tmp_path / "single"
    from medclipin.config import config_to_dict
    from medclipin.train.trainer import pretrain

    pretrain(cfg, single, progress=False)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run = tmp_path / "ddp"
    processes = _srun_pretrain(config_path, run)
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err.decode()[-3000:]
    assert b'"steps": 3' in outputs[0][0] and outputs[1][0] == b""  # only rank 0 reports

    def losses(folder):
        with (folder / "metrics.csv").open(newline="") as handle:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]

    ddp, one = losses(run), losses(single)
    assert [s for s, _ in ddp] == [1, 2, 3]  # written once (rank 0), not once per rank
    assert [l for _, l in ddp] == pytest.approx([l for _, l in one], abs=1e-4)
    from medclipin.train import checkpoint as ckpt

    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run))
    assert len(state["rng_per_rank"]) == WORLD and state["micro_step"] == 3
    # only rank 0 takes the run folder (its lock): a second launch as a fresh run is refused on every rank
    # at once, with rank 0's one-line reason, and nothing in the finished run changes
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = _srun_pretrain(config_path, run)
    for process in again:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err.decode()[-2000:]
        lines = [line for line in err.decode().splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "already holds a medclipin run" in lines[0], err.decode()[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_sync_batchnorm_converts_every_clipin_batchnorm_and_keeps_the_state_keys():
    from medclipin.models.model import MedClipModel
    from medclipin.train.objective import TrainingObjective

    cfg = tiny_model_config("model.clipin.sync_batchnorm=true")
    model = TrainingObjective(MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                                       vocab_size=VOCAB), cfg.model)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="GPU-only"):
        model.convert_sync_batchnorm(torch.device("cpu"))
    model.convert_sync_batchnorm(torch.device("cuda"))  # the conversion itself needs no GPU
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 + 4 + 2  # nc projectors, predictors, the target's nc projectors
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert list(model.state_dict()) == keys  # checkpoints load either way
    # the target's copies are still the online heads' mirrors, and the model itself has no batch norm to convert
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in model.clipin.target["image_nc"].modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    assert not [m for m in model.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.slow
def test_a_base_clip_trains_on_two_processes_as_on_one(tmp_path):
    """model.base under DDP: every rank loads the same base (the pre-projector's random directions are seeded),
    and 2 gloo processes log the single process's losses."""
    from test_bases import _tiny_open_clip_folder

    from medclipin.config import config_to_dict
    from medclipin.train.trainer import pretrain

    _tiny_open_clip_folder(tmp_path / "base")
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=5", f"model.base=open_clip:local-dir:{tmp_path / 'base'}",
                      clipin=False)
    pretrain(cfg, tmp_path / "single", progress=False)
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run = tmp_path / "ddp"
    processes = _srun_pretrain(config_path, run)
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-3000:]

    def losses(folder):
        with (folder / "metrics.csv").open(newline="") as handle:
            return [float(r["loss"]) for r in csv.DictReader(handle)]

    assert losses(run) == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
