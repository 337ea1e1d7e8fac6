"""The training run: config + manifest in, a run folder with checkpoints, metrics and a model out.

Run folder layout::

    RUN/.medclipin.lock      locked (fcntl.flock) while a run uses the folder; marks it as a medclipin run folder
    RUN/config.yaml          the resolved configuration (written once; a resume must keep its math)
    RUN/metrics.csv          one row per logged step (step, epoch, loss, lr, grad_norm, samples_per_s, terms, monitors)
    RUN/validation.jsonl     one line per validation (step, score, R@K, zero-shot AUC), when validation runs
    RUN/tensorboard/         the same scalars, when the ``tensorboard`` package is installed
    RUN/tokenizer/           the WordPiece tokenizer trained on the train split (towers built from config only)
    RUN/rejects.csv          images that could not be read (path, reason), when there were any
    RUN/checkpoints/step_*/  atomic checkpoints (the newest ``train.keep_checkpoints`` kept)
    RUN/model/               the final model with its processor (save_pretrained form; ``medclipin.load``)
    RUN/best/                the best model by validation score (when validation runs)

Who may write in the folder (new or empty folders only, one run at a time, a resume keeps the run's
configuration) is :mod:`medclipin.train.run_folder`; nothing is written before the run is set up.
This module is the run and its files (set-up, data order, resume, checkpoints, logging, validation);
one optimiser step — autocast, accumulation, clipping, the non-finite guard — is
:class:`medclipin.train.step.TrainStep`.

Resuming is exact: the checkpoint holds the model, the objective's own state (EMA target, CLIPin
heads, λ), optimiser, scheduler, scaler, every rank's RNG state and the number of micro-batches consumed.
The data order is a function of (seed, epoch) and augmentation of (seed, epoch, index), so the resumed
run rebuilds the epoch's index list, skips the consumed batches and continues bit-for-bit.
"""

from __future__ import annotations

import copy

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from medclipin.atomic import atomic_open, file_sha256
from medclipin.config import Config, ConfigError, config_to_dict
from medclipin.errors import MedclipinError
from medclipin.data.dataset import ImageTextDataset, TextImageCollator, select_usable
from medclipin.data.manifest import read_manifest
from medclipin.data.processor import Processor
from medclipin.data.reports import record_text
from medclipin.data.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece_tokenizer
from medclipin.models.model import MedClipModel
from medclipin.models.weights import resolve_normalization
from medclipin.train.objective import TrainingObjective
from medclipin.train import checkpoint as ckpt
from medclipin.train import preflight, run_folder
from medclipin.train.cpu_runtime import configure_cpu
from medclipin.train.distributed import DistInfo, cleanup, init_distributed
from medclipin.train.monitor import MetricsLog, Progress, TensorBoardLog
from medclipin.train.optim import build_optimizer, build_scheduler, tower_learning_rates
from medclipin.train.step import (  # noqa: F401  (re-exported: the public names of the training engine)
    NonFiniteLossError,
    TrainStep,
    autocast_context,
    fast_bf16_available,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)


class UnreadableImagesError(MedclipinError, RuntimeError):
    """More training images could not be read than ``data.max_bad_fraction`` allows."""


class RunSetupError(MedclipinError, ValueError):
    """The configuration and the data cannot make a run (no train records, a batch larger than the usable
    records, ...). Raised before anything is written into the run folder."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    samples_per_s: float
    wall_s: float
    skipped_nonfinite: int = 0
    skipped_records: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    rejects_path: Path | None = None


def trains_own_tokenizer(cfg: Config) -> bool:
    """True when the run uses a WordPiece tokenizer of its own (``RUN/tokenizer``): no tokenizer configured
    and a text tower built from configuration."""
    return not cfg.data.text.tokenizer and not cfg.model.text_encoder.pretrained


def prepare_tokenizer(cfg: Config, run_dir: Path, train_texts: list[str], start: Path | None = None):
    """The configured tokenizer; else a pretrained text tower's own; else the run's WordPiece tokenizer:
    ``RUN/tokenizer`` when the run has one (a resume), the checkpoint's own when starting from a checkpoint of
    another folder (its weights were trained with that vocabulary), else one trained now on the train split's
    reports. Training is deterministic, so every DDP process trains the same one. Nothing is written into the
    run folder here: the trainer saves the tokenizer there once the whole run is set up."""
    if cfg.data.text.tokenizer:
        return load_tokenizer(cfg.data.text.tokenizer)
    if cfg.model.text_encoder.pretrained:
        return load_tokenizer(cfg.model.text_encoder.pretrained)
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(str(folder))
    if start is not None and (start / "model" / "tokenizer.json").is_file():
        return load_tokenizer(str(start / "model"))
    if cfg.train.init_from:  # fine-tuning a trained model: its weights were trained with its vocabulary
        from medclipin.api import resolve_model_dir

        return load_tokenizer(str(resolve_model_dir(cfg.train.init_from)))
    with tempfile.TemporaryDirectory(prefix="medclipin-tokenizer-") as staging:
        # loaded back from its files, as a resumed run will load RUN/tokenizer
        train_wordpiece_tokenizer(train_texts, vocab_size=cfg.data.text.vocab_size, out_dir=staging,
                                  min_frequency=cfg.data.text.min_frequency)
        return load_tokenizer(staging)


def init_from_model(model: MedClipModel, path: str) -> None:
    """Start from a trained medclipin model (``train.init_from``: a model, run or checkpoint folder), e.g. to
    fine-tune the demo model on your own data. Its architecture must be the configured one."""
    from medclipin.api import resolve_model_dir
    from medclipin.models.model import WEIGHTS_NAME, _load_weights

    folder = resolve_model_dir(path)
    try:
        _load_weights(model, folder / WEIGHTS_NAME, "cpu")
    except MedclipinError as exc:
        raise MedclipinError(f"train.init_from={path}: {exc}") from None
    log.info("initialised the model from %s", folder)


# A base CLIP loaded while its settings were applied to the config, kept for _set_up (loaded once per run)
_LOADED_BASES: dict[tuple, tuple] = {}


def _base_key(cfg: Config) -> tuple:
    m = cfg.model
    towers = tuple(getattr(t, name, None) for t in (m.image_encoder, m.text_encoder) for name in
                   ("freeze", "freeze_layers", "grad_checkpointing", "train_fp32"))
    return (m.base, m.base_weights, m.clipin.pre_dim if m.clipin.enabled else 0, m.contrastive.kind,
            m.base_fresh_heads, cfg.train.seed, towers)


def load_configured_base(cfg: Config):
    """``(model, processor)`` of ``model.base`` as this config asks (CLIPin pre-projector, objective kind)."""
    from medclipin.models.bases import load_base

    key = _base_key(cfg)
    if key not in _LOADED_BASES:
        m = cfg.model
        _LOADED_BASES.clear()
        _LOADED_BASES[key] = load_base(m.base, m.base_weights, pre_dim=key[2], kind=m.contrastive.kind,
                                       fresh_heads=m.base_fresh_heads, seed=cfg.train.seed,
                                       siglip_init_logit_bias=m.contrastive.siglip_init_logit_bias,
                                       max_logit_scale=m.contrastive.max_logit_scale,
                                       image_training=m.image_encoder, text_training=m.text_encoder)
    return _LOADED_BASES[key]


def apply_base_settings(cfg: Config) -> None:
    """With ``model.base``, the image and text settings the base was trained with replace the config's (size,
    3 channels, mean/std, the text context as the longest text), and the joint width is the base's: the run's
    saved config.yaml then says what the model really reads."""
    if not cfg.model.base:
        return
    model, processor = load_configured_base(cfg)
    image = cfg.data.image
    image.size, image.channels = processor.image_cfg.size, 3
    image.mean, image.std = tuple(processor.image_cfg.mean), tuple(processor.image_cfg.std)
    cfg.data.text.max_length = min(cfg.data.text.max_length, processor.text_cfg.max_length)
    cfg.data.text.tokenizer = ""
    cfg.model.contrastive.embed_dim = model.embed_dim


def prepare_processor(cfg: Config, run_dir: Path, train_records: list, start: Path | None = None) -> Processor:
    """The run's processor: resolved image normalisation, the tokenizer (:func:`prepare_tokenizer`; a base
    CLIP's own with ``model.base``), text settings."""
    if cfg.model.base:
        apply_base_settings(cfg)
        return Processor(cfg.data.image, cfg.data.text, load_configured_base(cfg)[1].tokenizer)
    resolve_normalization(cfg)
    texts = [record_text(r, cfg.data.text.sections) for r in train_records]
    return Processor(cfg.data.image, cfg.data.text, prepare_tokenizer(cfg, run_dir, texts, start))


def epoch_indices(sampler: DistributedSampler, epoch: int) -> list[int]:
    """This rank's sample order for ``epoch``: a pure function of (seed, epoch, rank, world size)."""
    sampler.set_epoch(epoch)
    return list(iter(sampler))


class BatchStream:
    """Endless micro-batches in a reproducible order, starting after ``consumed`` micro-batches.

    Each epoch's index list comes from the DistributedSampler (``set_epoch``); on resume the epoch is
    rebuilt and its consumed batches are skipped by slicing the index list (no decoding of skipped items).
    The DataLoader gets its own generator so creating an iterator never draws from torch's global RNG
    (which dropout uses and checkpoints restore).
    """

    def __init__(self, dataset: ImageTextDataset, sampler: DistributedSampler, local_batch: int, collate,
                 num_workers: int, pin_memory: bool, seed: int, consumed: int = 0, on_rejected=None):
        self.dataset, self.sampler, self.local_batch, self.collate = dataset, sampler, local_batch, collate
        self.on_rejected = on_rejected
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self.batches_per_epoch = len(sampler) // local_batch
        self.consumed = consumed
        self.epoch = consumed // self.batches_per_epoch
        self._iterator = self._open(self.epoch, consumed % self.batches_per_epoch)

    def _open(self, epoch: int, skip: int):
        self.dataset.set_epoch(epoch)
        indices = epoch_indices(self.sampler, epoch)[skip * self.local_batch:]
        loader = DataLoader(
            self.dataset, batch_size=self.local_batch, sampler=indices, collate_fn=self.collate, drop_last=True,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        return iter(loader)

    def __call__(self) -> dict:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._iterator = self._open(self.epoch, 0)
            batch = next(self._iterator)
        self.consumed += 1
        rejected = batch.pop("rejected", None)
        if rejected and self.on_rejected is not None:
            self.on_rejected(rejected)
        return batch


def _gather_rng_states(dist_info: DistInfo) -> list[dict]:
    state = ckpt.rng_state()
    if not dist_info.enabled:
        return [state]
    states: list = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


def _restore_rng(saved: dict, dist_info: DistInfo, seed: int, step: int) -> None:
    states = saved.get("rng_per_rank") or [saved["rng"]]
    if len(states) == dist_info.world_size:
        ckpt.set_rng_state(states[dist_info.rank])
        return
    # resumed on a different number of processes: rank 0's state, and a fresh per-rank stream elsewhere
    ckpt.set_rng_state(states[0])
    if dist_info.rank:
        torch.manual_seed(seed + dist_info.rank + 7919 * step)
    log.warning("checkpoint was written by %d processes, resuming on %d: per-rank RNG streams differ from "
                "an uninterrupted run", len(states), dist_info.world_size)


def _resolve_start(run_dir: Path, resume: str) -> Path | None:
    if resume == "auto":
        return ckpt.latest_checkpoint(run_dir)
    if resume:
        path = Path(resume)
        if not ckpt.is_valid_checkpoint(path):
            raise ckpt.CheckpointError(f"{path}: not a complete checkpoint (expected {ckpt.STATE_NAME} and model/)")
        return path
    return None


def _main_decides(dist_info: DistInfo, check):
    """Run ``check`` on rank 0 only; its refusal (a :class:`MedclipinError`) is raised on every rank, so no
    rank is left waiting at a barrier for one that stopped. Returns what ``check`` returned (rank 0)."""
    result, failure = None, None
    if dist_info.is_main:
        try:
            result = check()
        except MedclipinError as exc:
            failure = exc
    if dist_info.enabled:
        shared = [failure]
        dist.broadcast_object_list(shared, src=0)
        failure = shared[0]
    if failure is not None:
        raise failure
    return result


def _claim_run_folder(run_dir: Path, cfg: Config, resume: str, dist_info: DistInfo) -> run_folder.RunLock | None:
    """Rank 0 takes the run folder (:func:`medclipin.train.run_folder.claim`); every rank raises its refusal."""
    return _main_decides(dist_info, lambda: run_folder.claim(run_dir, cfg, resume))


def pretrain(
    cfg: Config,
    run_dir: str | os.PathLike,
    resume: str = "",
    progress: bool = True,
    validate_fn=None,
) -> TrainResult:
    """Train a model as configured and write the run folder.

    Launch one process on a CPU or one GPU; under ``torchrun`` or ``srun`` every process calls this and
    the ranks share ``train.batch_size`` (the global, contrastive batch).

    The run folder is locked for the whole run, and nothing is written into it before the run is set up
    (data counted, tokenizer and model built, checkpoint loaded): see :mod:`medclipin.train.run_folder`.

    Args:
        cfg: the whole configuration (data.manifest must point at a manifest with a train split).
        run_dir: output folder (created). A fresh run needs a new or empty folder.
        resume: ``""`` (fresh), ``"auto"`` (newest valid checkpoint in run_dir; fresh when none) or a
            checkpoint folder. A resume in a folder with a ``config.yaml`` must keep the run's math.
        progress: show a progress bar (terminal) or log lines (otherwise).
        validate_fn: ``fn(model, processor, step) -> dict`` with a ``"score"`` key (higher is better),
            called every ``train.validate_every`` steps and at the end on the main process; the best
            model is kept in ``RUN/best``. See :func:`medclipin.train.validation.build_validate_fn`.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` consecutive non-finite steps. Their updates
            were skipped, so no checkpoint holds non-finite weights, and no final model is written.
        RunFolderError: the folder is not new or empty (fresh run), not a run folder (resume), or in use.
        ResumeConfigError: a resume whose configuration changes the run's math.
        RunSetupError: no train records, or fewer usable ones than ``train.batch_size``.
    """
    run_dir = Path(run_dir)
    tcfg = cfg.train
    for key in ("batch_size", "grad_accum", "steps", "log_every", "checkpoint_every"):
        if getattr(tcfg, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(tcfg, key)}")
    device = resolve_device(tcfg.device)
    owns_group = not dist.is_initialized()
    dist_info: DistInfo = init_distributed(device.type)
    lock = None
    try:
        apply_base_settings(cfg)  # a base CLIP's own image and text settings
        resolve_normalization(cfg)  # the configuration as it will be saved, before comparing it with a run's
        lock = _claim_run_folder(run_dir, cfg, resume, dist_info)
        return _run(cfg, run_dir, resume, progress, validate_fn, device, dist_info)
    finally:
        if lock is not None:
            lock.release()
        if owns_group:
            cleanup()


@dataclass
class _Run:
    """Everything a training run holds once it is set up (:func:`_set_up`), for the loop (:func:`_train`)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: str
    dist_info: DistInfo
    processor: Processor
    model: MedClipModel
    objective: TrainingObjective
    dataset: ImageTextDataset
    batches: "BatchStream"
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    train_step: TrainStep
    rejects: "RejectLog"
    manifest_sha256: str = ""
    step: int = 0
    best: dict = field(default_factory=dict)
    final_row: dict = field(default_factory=dict)  # the final step's metrics row, from the final checkpoint


def _run(cfg: Config, run_dir: Path, resume: str, progress: bool, validate_fn, device: torch.device,
         dist_info: DistInfo) -> TrainResult:
    run = _set_up(cfg, run_dir, resume, device, dist_info)
    return _train(run, validate_fn, progress)


def _set_up(cfg: Config, run_dir: Path, resume: str, device: torch.device, dist_info: DistInfo) -> _Run:
    """Records → processor → model + objective → data stream and optimiser, restored from a checkpoint when
    resuming. Everything that can refuse the run happens before the run folder gets a file."""
    tcfg = cfg.train
    precision = resolve_precision(tcfg.precision, device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.cuda_index())
    configure_cpu(tcfg.threads, tcfg.retain_freed_memory, device)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    manifest = read_manifest(cfg.data.manifest)
    train_records = manifest.split("train")
    global_batch = tcfg.batch_size
    if global_batch % dist_info.world_size:
        raise RunSetupError(f"train.batch_size={global_batch} must be divisible by the {dist_info.world_size} processes")
    _check_enough_records(cfg, manifest, train_records, global_batch)
    start_path = _resolve_start(run_dir, resume)
    manifest_sha256 = file_sha256(cfg.data.manifest)
    saved_state = ckpt.load_training_state(start_path) if start_path is not None else None
    if saved_state is not None:
        run_folder.check_resume_state(run_dir, start_path, saved_state, cfg, manifest_sha256)
    processor = prepare_processor(cfg, run_dir, train_records, start_path)
    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    try:
        if cfg.model.base:  # a pretrained CLIP, embedding at step 0 exactly as its library does
            model = copy.deepcopy(load_configured_base(cfg)[0]).train()
            _LOADED_BASES.clear()
        else:
            model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                             vocab_size=processor.vocab_size)
        if tcfg.init_from and start_path is None:
            init_from_model(model, tcfg.init_from)
        objective = TrainingObjective(model, cfg.model)  # the EMA target copies the initial weights
        if objective.clipin is not None:  # read only after the first step: checked before it
            objective.clipin.momentum(0, tcfg.steps)
    except MedclipinError:
        raise
    except TypeError as exc:  # an unknown or mistyped keyword reaches timm or transformers as a TypeError
        raise RunSetupError(f"the model cannot be built from the configuration ({exc}): check "
                            "model.image_encoder.kwargs and model.text_encoder.config") from None
    except ValueError as exc:  # the towers and the objective check their model.* settings with ValueErrors
        raise RunSetupError(f"the model cannot be built from the configuration: {exc}") from None
    if cfg.model.clipin.enabled and cfg.model.clipin.sync_batchnorm and dist_info.enabled:
        objective.convert_sync_batchnorm(device)
    objective.to(device)
    torch.manual_seed(tcfg.seed + dist_info.rank)  # per-rank dropout streams

    dataset = ImageTextDataset(train_records, processor, train=True, two_views=objective.needs_two_views,
                               cache_dir=cfg.data.cache, seed=tcfg.seed)
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                 seed=tcfg.seed, drop_last=True)
    optimizer = build_optimizer(objective, tcfg, device, lrs=tower_learning_rates(model, tcfg))
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, consumed, nonfinite_total, best, final_row = _restore(start_path, saved_state, objective, optimizer,
                                                                scheduler, scaler, dist_info, tcfg.seed)
    if start_path is None and resume == "auto" and dist_info.is_main:
        log.info("no complete checkpoint in %s: starting from step 0", run_dir)
    # what the first checkpoint will need, checked before the first step (a full disk fails now, not there)
    _main_decides(dist_info, lambda: preflight.check_run_folder_space(run_dir, objective))
    if dist_info.is_main:
        sample = train_records[::max(1, len(train_records) // 500)]
        preflight.check_tokenizer_coverage(processor, [record_text(r, cfg.data.text.sections) for r in sample])
        _write_run_files(run_dir, cfg, processor, step)
    if dist_info.enabled:
        dist.barrier()

    train_module: torch.nn.Module = objective
    if dist_info.enabled:
        train_module = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=objective.has_unused_parameters,
        )
    if tcfg.compile:
        train_module = torch.compile(train_module)
    train_step = TrainStep(objective, train_module, optimizer, scheduler, scaler, tcfg, precision, device, dist_info,
                           ddp=dist_info.enabled, nonfinite_total=nonfinite_total)
    rejects = RejectLog(run_dir / "rejects.csv", len(dataset), cfg.data.max_bad_fraction, dist_info.is_main,
                        resumed=step > 0)
    batches = BatchStream(dataset, sampler, global_batch // dist_info.world_size, TextImageCollator(processor),
                          cfg.data.num_workers, pin_memory=device.type == "cuda", seed=tcfg.seed, consumed=consumed,
                          on_rejected=rejects.add)
    return _Run(cfg=cfg, run_dir=run_dir, device=device, precision=precision, dist_info=dist_info,
                processor=processor, model=model, objective=objective, dataset=dataset, batches=batches,
                optimizer=optimizer, scheduler=scheduler, scaler=scaler, train_step=train_step, rejects=rejects,
                manifest_sha256=manifest_sha256, step=step, best=best, final_row=final_row)


def _restore(start_path: Path | None, state: dict | None, objective, optimizer, scheduler, scaler,
             dist_info: DistInfo, seed: int) -> tuple[int, int, int, dict, dict]:
    """Weights, optimiser, schedule, scaler and every RNG stream from a checkpoint (nothing when starting
    fresh). Returns (step, micro-batches consumed, non-finite steps so far, best validation figures, the final
    step's metrics row when this is the final checkpoint)."""
    if start_path is None:
        return 0, 0, 0, {}, {}
    ckpt.load_checkpoint_weights(objective, start_path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    _restore_rng(state, dist_info, seed, step)
    if dist_info.is_main:
        log.info("resumed from %s at step %d", start_path.name, step)
    return (step, int(state["micro_step"]), int(state.get("nonfinite_total", 0)), dict(state.get("best", {})),
            dict(state.get("final_row") or {}))


def _write_run_files(run_dir: Path, cfg: Config, processor, step: int) -> None:
    """The run folder's own files, written once everything that can refuse the run has passed: config.yaml
    (once; a resume never rewrites it) and a tokenizer trained for this run."""
    run_folder.write_config(run_dir, cfg)
    if trains_own_tokenizer(cfg) and not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        save_tokenizer(processor.tokenizer, run_dir / "tokenizer")
    if step == 0:  # left by a run of this folder killed before its first checkpoint: everything is redone
        for stale in ("metrics.csv", "validation.jsonl", "rejects.csv"):
            (run_dir / stale).unlink(missing_ok=True)


def _train(run: _Run, validate_fn, progress: bool) -> TrainResult:
    """The loop: steps, logging, validation, checkpoints. The final step's metrics row (kept in the final
    checkpoint), the final checkpoint and ``RUN/model`` are written before the last validation, which may still
    fail; a run resumed after its final step completes whatever the final step left undone (:func:`_finish`)."""
    tcfg, dist_info, run_dir = run.cfg.train, run.dist_info, run.run_dir
    metrics = MetricsLog(run_dir / "metrics.csv",
                         extra_columns=[f"val_{c}" for c in getattr(validate_fn, "columns", ())])
    if dist_info.is_main:
        metrics.truncate_after(run.step)  # rows of steps after the checkpoint are redone
        _truncate_jsonl(run_dir / "validation.jsonl", run.step)
    tensorboard = TensorBoardLog(run_dir / "tensorboard", enabled=dist_info.is_main)
    total = tcfg.steps
    bar = Progress(total, run.step, progress and dist_info.is_main)
    samples_done, interval_samples, logged_skipped = 0, 0, run.train_step.nonfinite_total
    interval_start = wall_start = time.perf_counter()
    wall = 0.0
    run.objective.train()
    model_dir = run_dir / "model"
    try:
        if run.step >= total:  # resumed from the final checkpoint: the steps are done, their aftermath may not be
            _finish(run, validate_fn, metrics, tensorboard)
        while run.step < total:
            outcome = run.train_step(run.batches, run.step)
            samples_done += outcome.samples
            interval_samples += outcome.samples
            run.step += 1
            step, final = run.step, run.step == total
            checkpoint_due = step % tcfg.checkpoint_every == 0 or final
            validation_due = validate_fn is not None and (final or (tcfg.validate_every and step % tcfg.validate_every == 0))
            # the host reads the step's outcome only here (log steps) and before a checkpoint
            monitored = bool(tcfg.grad_monitor_every) and step % tcfg.grad_monitor_every == 0
            row = None
            if step % tcfg.log_every == 0 or final or validation_due or monitored:
                now = time.perf_counter()
                rate = interval_samples / max(now - interval_start, 1e-9)
                interval_start, interval_samples = now, 0
                row, logged_skipped = _step_row(run, outcome, rate, logged_skipped)
            if final:
                wall = time.perf_counter() - wall_start
                # the final row, checkpoint and model are on disk before the last validation, which may still fail
                _checkpoint(run, final_row=row)
                if dist_info.is_main:
                    run.model.save_pretrained(model_dir, processor=run.processor)
            validation: dict = {}
            if validation_due:
                run.best, validation = _validate(run.model, run.processor, step, validate_fn, run.best, run_dir,
                                                 dist_info, tensorboard)
            if row is not None:
                _write_row(run, {**row, **{f"val_{k}": v for k, v in validation.items()}}, metrics, tensorboard, bar)
            if checkpoint_due and not final:
                _checkpoint(run)
        if dist_info.enabled:
            dist.barrier()
    finally:
        bar.close()
        tensorboard.close()
    rejects = run.rejects
    if rejects.count and dist_info.is_main:
        log.warning("%d training image(s) could not be read and were skipped: listed in %s", rejects.count,
                    rejects.path)
    skipped_records = dict(run.dataset.skipped)
    if rejects.count:
        skipped_records["image unreadable"] = rejects.count
    return TrainResult(
        run_dir=run_dir, model_dir=model_dir, steps=run.step, samples_per_s=samples_done / max(wall, 1e-9),
        wall_s=wall, skipped_nonfinite=run.train_step.nonfinite_total, skipped_records=skipped_records,
        best=run.best, rejects_path=rejects.path if rejects.count else None,
    )


def _finish(run: _Run, validate_fn, metrics: MetricsLog, tensorboard: TensorBoardLog) -> None:
    """Complete a run resumed from its final checkpoint: a kill after the final checkpoint (during the model
    write, the final validation, the ``RUN/best`` save or the last metrics row) left some of these undone, and
    each is done now, once: ``RUN/model``, the final validation (which saves ``RUN/best`` before it is recorded
    in ``validation.jsonl``, so a recorded validation has its best model on disk), and the final metrics row
    (kept in the final checkpoint, with the validation's numbers)."""
    dist_info, run_dir, step = run.dist_info, run.run_dir, run.step
    if dist_info.is_main and not _is_model_folder(run_dir / "model"):
        log.info("resumed after the final step: writing %s", run_dir / "model")
        run.model.save_pretrained(run_dir / "model", processor=run.processor)
    validation: dict = {}
    if validate_fn is not None:
        recorded = _recorded_validations(run_dir)
        if step in recorded:
            validation = recorded[step]
            run.best = _best_of(recorded)
        else:
            log.info("resumed after the final step: redoing the final validation")
            run.best, validation = _validate(run.model, run.processor, step, validate_fn, run.best, run_dir,
                                             dist_info, tensorboard)
    if dist_info.is_main and run.final_row and not metrics.has_step(step):
        metrics.write({**run.final_row, **{f"val_{k}": v for k, v in validation.items()}})


def _is_model_folder(folder: Path) -> bool:
    from medclipin.models.model import CONFIG_NAME, WEIGHTS_NAME

    return (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()


def _step_row(run: _Run, outcome, rate: float, logged_skipped: int) -> tuple[dict, int]:
    """One step's ``metrics.csv`` row (losses, monitors; validation numbers are added by the caller) and the
    number of skipped steps now reported."""
    skipped = run.train_step.nonfinite_total
    if skipped > logged_skipped and run.dist_info.is_main:
        log.warning("%d step(s) up to step %d had a non-finite loss or gradient: updates skipped "
                    "(%d in this run so far)", skipped - logged_skipped, run.step, skipped)
    row = {"step": run.step, "epoch": run.batches.epoch, "loss": float(outcome.loss),
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(outcome.grad_norm),
           "samples_per_s": rate, "skipped_nonfinite": skipped, "rejected_images": run.rejects.count}
    row.update({k: float(v) for k, v in outcome.terms.items()})
    row.update({k: float(v) for k, v in outcome.stats.items()})
    return row, skipped


def _write_row(run: _Run, row: dict, metrics: MetricsLog, tensorboard: TensorBoardLog, bar: Progress) -> None:
    """A row into ``metrics.csv``, TensorBoard and the progress display (main process)."""
    if run.dist_info.is_main:
        metrics.write(row)
        tensorboard.write({k: v for k, v in row.items() if not k.startswith("val_")}, run.step)
        bar.update(run.step, {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}",
                              "samples/s": f"{row['samples_per_s']:.1f}"})


def _checkpoint(run: _Run, final_row: dict | None = None) -> None:
    run.train_step.guard.check()  # a run that has gone non-finite stops here rather than saving
    _save_checkpoint(run.run_dir, run.step, run.objective, run.processor, run.optimizer, run.scheduler, run.scaler,
                     run.batches, run.train_step, run.best, run.dist_info, run.cfg.train.keep_checkpoints,
                     extra={"manifest_sha256": run.manifest_sha256, "config": config_to_dict(run.cfg),
                            **({"final_row": final_row} if final_row else {})})


def _save_checkpoint(run_dir: Path, step: int, objective: TrainingObjective, processor: Processor, optimizer,
                     scheduler, scaler, batches: "BatchStream", train_step: TrainStep, best: dict,
                     dist_info: DistInfo, keep: int, extra: dict | None = None) -> None:
    state = {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "micro_step": batches.consumed,
        "nonfinite_total": train_step.nonfinite_total, "best": best, **(extra or {}),
    }
    rng_states = _gather_rng_states(dist_info)
    if dist_info.is_main:
        ckpt.save_checkpoint(run_dir, step, objective, processor,
                             {**state, "rng": rng_states[0], "rng_per_rank": rng_states}, keep=keep)


class RejectLog:
    """Training images that could not be read: named in ``RUN/rejects.csv``, counted, and a run whose share
    of unreadable images passes ``data.max_bad_fraction`` stops with a clear error."""

    def __init__(self, path: Path, n_images: int, max_fraction: float, write: bool, resumed: bool = True):
        self.path, self.n_images, self.max_fraction, self.write = path, max(n_images, 1), max_fraction, write
        self.seen: dict[str, str] = {}
        if resumed and path.is_file():  # a resumed run: what was already found
            import csv

            with path.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    self.seen[row.get("image_path", "")] = row.get("reason", "")

    @property
    def count(self) -> int:
        return len(self.seen)

    def add(self, pairs) -> None:
        new = [(path, reason) for path, reason in pairs if path not in self.seen]
        if not new:
            return
        for path, reason in new:
            self.seen[path] = reason
        # the paths (which can hold patient identifiers) and reasons go to the file, not the console
        log.warning("skipping %d unreadable training image(s), %d so far: listed with the reasons in %s",
                    len(new), self.count, self.path)
        if self.write:
            import csv

            with atomic_open(self.path, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["image_path", "reason"])
                writer.writerows(sorted(self.seen.items()))
        if self.count / self.n_images > self.max_fraction:
            raise UnreadableImagesError(
                f"{self.count} of {self.n_images} training images could not be read, more than "
                f"data.max_bad_fraction={self.max_fraction}; they are listed in {self.path}. Fix or remove them "
                "(medclipin validate --all names every bad file), or raise the limit")


def _check_enough_records(cfg: Config, manifest, train_records: list, global_batch: int) -> None:
    """Refuse a run whose train split cannot fill one batch, before anything is written."""
    if not train_records:
        counts = {split: len(manifest.split(split)) for split in ("train", "validate", "test")}
        raise RunSetupError(f"{cfg.data.manifest}: no records in the train split (splits: {counts}); nothing to train on")
    usable = select_usable(train_records, cfg.data.text.sections, cfg.data.cache)
    if len(usable.records) < global_batch:
        skipped = "".join(f", {n} {why}" for why, n in usable.skipped.items())
        raise RunSetupError(
            f"{cfg.data.manifest}: the train split has {len(usable.records)} usable records ({len(train_records)} in all"
            f"{skipped}), fewer than train.batch_size={global_batch}; lower train.batch_size or add records")


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a line torn by a kill
    with atomic_open(path, "w") as handle:
        handle.write("".join(line + "\n" for line in kept))


def _recorded_validations(run_dir: Path) -> dict[int, dict]:
    """step -> the numbers of each validation recorded in ``validation.jsonl`` (torn lines skipped)."""
    path = run_dir / "validation.jsonl"
    found: dict[int, dict] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            values = json.loads(line)
            found[int(values.pop("step"))] = {k: float(v) for k, v in values.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return found


def _best_of(recorded: dict[int, dict]) -> dict:
    """The best validation as :func:`_validate` keeps it: the first of the highest scores."""
    best: dict = {}
    for step in sorted(recorded):
        if "score" in recorded[step] and (not best or recorded[step]["score"] > best["score"]):
            best = {"step": step, **recorded[step]}
    return best


def _validate(model: MedClipModel, processor: Processor, step: int, validate_fn, best: dict, run_dir: Path,
              dist_info: DistInfo, tensorboard: TensorBoardLog) -> tuple[dict, dict]:
    """Run ``validate_fn`` on the main process; keep the best model in RUN/best. Returns (best record, this
    validation's numbers) — the numbers only on the main process."""
    result: dict = {}
    if dist_info.is_main:
        was_training = model.training
        model.eval()
        # validation only watches the run: its draws (a DataLoader seeds itself from torch's global RNG) must not
        # move the streams training uses, or train.validate_every would change the losses
        streams = ckpt.rng_state()
        try:
            with torch.no_grad():
                result = {k: float(v) for k, v in validate_fn(model, processor, step).items()}
        finally:
            ckpt.set_rng_state(streams)
            model.train(was_training)
        log.info("validation at step %d: score %.4f", step, result["score"])
        # RUN/best first, then the record: a recorded validation always has its best model on disk
        if not best or result["score"] > best["score"]:
            best = {"step": step, **result}
            model.save_pretrained(run_dir / "best", processor=processor)
        with (run_dir / "validation.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, **result}) + "\n")
        tensorboard.write({f"validate/{k}": v for k, v in result.items()}, step)
    if dist_info.enabled:
        # every rank carries the same `best` into its checkpoint state; also waits for rank 0's validation
        shared = [best]
        dist.broadcast_object_list(shared, src=0)
        best = shared[0]
    return best, result
