"""`pipeline train`: train one AE / VAE / VQ-VAE under Accelerate.

    pipeline train --model vqvae --arch basic --train-shards shards/train \\
        --val-shards shards/val --output runs/vq --max-steps 20000
    accelerate launch -m pipeline.train ...      torchrun --nproc_per_node 8 -m pipeline.train ...

The loop reads top to bottom: draw `grad_accum` batches, forward, backward; agree across ranks
on "stop?" and "non-finite?" with one tiny all-reduce; clip, step, update the EMA; then log,
validate, draw image grids and checkpoint when their step comes. `--batch-size` is per device.

The streaming loader owns rank/worker splitting, so it never goes through
`accelerator.prepare` (that would split the stream a second time); only the model and the
optimizer do. The learning rate is a pure function of the step (`get_lr`), so the schedule's
whole state is the step stored in each checkpoint.

Checkpoints are written and read by `pipeline.checkpoint` (safetensors + JSON, verified
against the hashes in COMPLETE), not by `accelerator.save_state`, whose pickles would run
code on resume; `checkpoint_parts` is the table of what they hold. The main process holds
`RUN_DIR/.lock` for the whole run: a second trainer on the same RUN_DIR is refused on every
rank, before it writes anything.

Exit codes: 0 done; 2 a user error (bad config, non-finite loss with --train.nan_policy stop);
75 (`EXIT_PREEMPTED`, EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after writing a checkpoint:
requeue the same command with `--resume auto` (launch/slurm.sbatch does).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import math
import os
import signal
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import (Part, TrainerState, check_model_matches, collectively,
                         complete_checkpoints, load_checkpoint, read_record,
                         remove_stale_temporaries, resolve_resume, save_checkpoint)
from .config import (ALIASES, Config, OptimConfig, add_config_arguments, build_config,
                     list_presets, load_preset, to_yaml)
from .data import ShardSet, make_loader, normalize, resolve_spec
from .locking import Lock, acquire, describe_holder, holder_of
from .metrics import per_image_l1, per_image_mse, per_image_psnr, to_unit_range
from .models import build_model, compute_loss, save_pretrained
from .tracking import RunLogger, check_tracker_available, project_configuration
from .utils import PipelineError, atomic_write_json, atomic_write_text, available_cpus, provenance

EXIT_PREEMPTED = 75      # EX_TEMPFAIL: "try again"; launch/slurm.sbatch requeues on it
PREEMPTED_NAME = "preempted.json"
NUM_GRID_IMAGES = 8      # fixed val images shown as originals vs reconstructions
GRID_CAPTIONS = {"reconstructions": "top: fixed val originals; bottom: reconstructions",
                 "prior_samples": "decoded samples from the prior (fixed noise)"}
VQ_STATS = ("usage", "perplexity", "usage_window", "perplexity_window")
LOCK_NAME = ".lock"      # RUN_DIR/.lock: held by the main process for the whole run



# ---------------------------------------------------------------- configuration

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline train", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an AE / VAE / VQ-VAE on 64x64 shards (Accelerate: one GPU, DDP, "
                    "multi-node, bf16/fp16).\nEvery config field is an option "
                    "`--section.field VALUE`; the common ones have the short aliases listed "
                    "with them.",
        epilog=textwrap.fill("Short aliases: " + ", ".join(
            f"{alias} = --{dotted}" for alias, dotted in ALIASES.items()) + ".",
            width=79, break_on_hyphens=False)
        + f"\n\nExit status: 0 done, 2 bad input or non-finite loss, {EXIT_PREEMPTED} "
          f"preempted after a checkpoint\n(rerun the same command with --resume auto).")
    parser.add_argument(
        "--config", metavar="FILE_OR_PRESET", default=None,
        help="YAML file or preset name (" + ", ".join(list_presets()) + "); a run's "
             "config.yaml works too. Default: the preset named after --model "
             "(`resnet-<model>` with --arch resnet)")
    add_config_arguments(parser, ALIASES)
    return parser


def default_preset(args: argparse.Namespace) -> str | None:
    """The preset `--model/--arch` name when no --config is given (None if there is none:
    validation then reports an unknown model with the list of valid ones)."""
    model = getattr(args, "model.model") or "ae"
    arch = getattr(args, "model.arch") or "basic"
    name = model if arch == "basic" else f"{arch}-{model}"
    return name if name in list_presets() else None


def resolve_config(args: argparse.Namespace) -> Config:
    preset = args.config or default_preset(args)
    data = load_preset(preset) if preset else {}
    data.pop("run", None)  # a run's config.yaml also records provenance; not a config field
    return build_config(None, args, defaults=data, aliases=ALIASES)


def check_shards(spec: str, option: str, split: str, need_counts: bool = False) -> ShardSet:
    """Shard specs must resolve now, not after every rank has started."""
    hint = f"run `pipeline prepare --output DIR` and pass {option} DIR/{split}"
    if not spec:
        raise PipelineError(f"{option} is required: the {split} shard directory written by "
                            f"`pipeline prepare`; {hint}")
    try:
        shards = resolve_spec(spec)
    except PipelineError as e:
        raise PipelineError(f"{split} shards not found: {spec} ({e}); {hint}") from None
    if need_counts and shards.counts is None:
        raise PipelineError(f"{option} {spec}: the fixed validation subset needs the split "
                            f"directory with its manifest (per-shard counts); {hint}")
    return shards


def check_image_size(shards: ShardSet, spec: str, option: str, cfg: Config) -> None:
    """A manifest states the shards' image size: it must be the model's (shards without a
    manifest are checked on their first batch, `check_batch_shape`)."""
    size = shards.manifest.get("image_size") if shards.manifest else None
    if size is not None and size != cfg.model.image_size:
        raise PipelineError(f"{option} {spec}: the shards hold {size}x{size} images (their "
                            f"manifest), but the model is built for {cfg.model.image_size}px "
                            f"(--model.image_size); pass --model.image_size {size}, or "
                            f"prepare shards of {cfg.model.image_size}px")


def refuse_if_locked(run_dir: Path) -> None:
    """A running trainer on RUN_DIR: say so now, on every rank, before any collective (the
    lock itself is taken in `take_run_lock`, which closes the race)."""
    holder = holder_of(run_dir / LOCK_NAME)
    if holder is not None:
        raise PipelineError(f"--output {run_dir} is in use by another job: "
                            f"{describe_holder(holder)}; wait for it to finish, or choose "
                            f"another --output (lock file {run_dir / LOCK_NAME})")


def refuse_overwrite(run_dir: Path, resume_from: Path | None) -> None:
    if resume_from is None and complete_checkpoints(run_dir):
        raise PipelineError(f"{run_dir} already holds checkpoints of an earlier run: pass "
                            f"--resume auto to continue it, or choose a new --output")


def preflight(cfg: Config) -> Path | None:
    """Everything that can be checked before any process trains; returns the checkpoint
    to resume from (None: a fresh run), verified against its COMPLETE record."""
    for spec, option, split in ((cfg.data.train_shards, "--train-shards", "train"),
                                (cfg.data.val_shards, "--val-shards", "val")):
        shards = check_shards(spec, option, split, need_counts=split == "val")
        check_image_size(shards, spec, option, cfg)
    check_tracker_available(cfg.tracker.tracker)
    run_dir = Path(cfg.train.output)
    refuse_if_locked(run_dir)
    resume_from = resolve_resume(cfg.train.resume, run_dir)
    refuse_overwrite(run_dir, resume_from)
    if resume_from is not None:
        check_model_matches(resume_from, cfg.model)
    return resume_from


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    resume_from = preflight(cfg)
    return train(cfg, resume_from)


# ---------------------------------------------------------------- small pieces of the loop

def get_lr(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`
    at `max_steps`. `step` counts from 1."""
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine)


class WeightEMA:
    """Exponential moving average of a model's weights (buffers are copied as they are).

    Buffers are not averaged: an EMA'd VQ codebook would blend a restarted code with the
    dead one it replaced, and BatchNorm statistics belong to the weights that made them.
    Checkpoints hold `module`'s weights (the `ema` part of `checkpoint_parts`).
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.module = copy.deepcopy(model).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.module.parameters(), model.parameters()):
            ema.lerp_(live, 1 - self.decay)
        for ema, live in zip(self.module.buffers(), model.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption, time limit) only set a flag; the loop checks it
    once per step, in the same all-reduce on every rank, so all ranks stop at one step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Verdict:
    """What all ranks agreed on after a step's backward passes."""
    stop: bool
    nonfinite: list[str]  # names of loss terms that were nan/inf on some rank


def agree(accelerator: Accelerator, terms: dict[str, Tensor], stop_requested: bool) -> Verdict:
    """One all-reduce(max) per step of [stop flag, one non-finite flag per loss term]: every
    rank learns whether any rank was signalled or saw a nan/inf, and takes the same branch."""
    # The total comes last so that a message names the term that went bad first.
    names = [n for n in terms if n != "loss" and not n.startswith("vq/")] + ["loss"]
    flags = torch.stack([torch.tensor(float(stop_requested), device=terms["loss"].device),
                         *[(~torch.isfinite(terms[n])).float() for n in names]])
    flags = accelerator.reduce(flags, reduction="max").tolist()
    return Verdict(bool(flags[0]), [n for n, f in zip(names, flags[1:]) if f])


def loss_terms(loss: Tensor, parts: dict[str, Any], out) -> dict[str, Tensor]:
    """Every scalar worth checking and logging from one micro-batch, as detached tensors."""
    terms = {"loss": loss.detach()}
    terms.update({name: torch.as_tensor(value, device=loss.device).detach().float()
                  for name, value in sorted(parts.items())})
    terms.update({f"vq/{name}": out.stats[name].detach().float() for name in VQ_STATS
                  if name in out.stats})
    return terms


class Window:
    """Wall time, data-wait time and images seen since the last log line (this rank).

    Validation, image grids and checkpoints run `paused()`, so throughput and the
    data-wait fraction describe training steps only."""

    def __init__(self) -> None:
        self.start, self.data_wait, self.images = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - started

    def next_batch(self, batches: Iterator) -> Tensor:
        started = time.perf_counter()
        images, _labels, _keys = next(batches)
        self.data_wait += time.perf_counter() - started
        self.images += images.shape[0]
        return images

    def perf(self, world_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        # Ranks run in lock-step under DDP, so global throughput is world_size x this rank's.
        return {"perf/images_per_s": self.images / elapsed * world_size,
                "perf/data_wait_frac": self.data_wait / elapsed}


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"perf/peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def limit_threads() -> None:
    """Share this job's cores between the processes of one node; torch would otherwise
    start one thread per core of the whole machine in every process. An explicit
    OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cpus() // local_world_size))


# ---------------------------------------------------------------- validation and images

@dataclass
class ValSet:
    """The fixed validation subset, read once and kept as uint8 (this rank's share)."""
    images: Tensor
    mean_image_recon: float  # error of predicting the subset's mean image (global)


def recon_error(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-image reconstruction error, same definition as the training loss (mean over pixels)."""
    return per_image_l1(pred, target) if kind == "l1" else per_image_mse(pred, target)


def load_val_set(cfg: Config, accelerator: Accelerator) -> ValSet:
    """Read this rank's share of the fixed val subset once (in-process: it is read a single
    time, so a worker process would cost more than it saves)."""
    loader = make_loader(cfg.data.val_shards, cfg.train.batch_size, mode="eval", num_workers=0,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_samples=cfg.data.val_samples)

    def read_images() -> Tensor:
        m = cfg.model
        batches = [images for images, _labels, _keys in loader]
        images = (torch.cat(batches) if batches else
                  torch.zeros(0, m.in_channels, m.image_size, m.image_size, dtype=torch.uint8))
        check_batch_shape(images, cfg, "--val-shards")
        return images

    # One rank that cannot read its share (or finds the wrong size) stops all of them.
    images = collectively(accelerator, read_images, "reading the validation subset")
    return ValSet(images, mean_image_error(images, cfg, accelerator))


def check_batch_shape(images: Tensor, cfg: Config, option: str) -> None:
    """Images of another size (or channel count) than the model's would train and validate
    without a word and give an export that claims the wrong size: refuse them."""
    m = cfg.model
    expected = (m.in_channels, m.image_size, m.image_size)
    found = tuple(images.shape[1:])
    if found != expected:
        spec = getattr(cfg.data, "train_shards" if option == "--train-shards" else "val_shards")
        raise PipelineError(f"{option} {spec}: the images are {found[0]}x{found[1]}x"
                            f"{found[2]} (channels x height x width), but the model is built "
                            f"for {expected[0]}x{expected[1]}x{expected[2]} "
                            f"(--model.in_channels, --model.image_size); pass "
                            f"--model.image_size {found[1]}, or prepare shards of "
                            f"{m.image_size}px")


def mean_image_error(images: Tensor, cfg: Config, accelerator: Accelerator) -> float:
    """The error of always predicting the subset's mean image: the bar a model must beat."""
    x = normalize(images.to(accelerator.device))
    count = accelerator.reduce(torch.tensor(float(len(x)), device=x.device), "sum").item()
    if count == 0:
        raise PipelineError(f"--val-shards {cfg.data.val_shards}: no validation image could be "
                            f"read; check the shards with `pipeline bench load --shards ...`")
    mean_image = accelerator.reduce(x.sum(0), "sum") / count
    errors = recon_error(mean_image.expand_as(x), x, cfg.loss.recon)
    return accelerator.reduce(errors.sum(), "sum").item() / count


@torch.no_grad()
def validate(model: nn.Module, val: ValSet, cfg: Config, accelerator: Accelerator,
             step: int) -> dict[str, float]:
    """Loss terms, MSE and PSNR on the fixed val subset; sums reduced across ranks."""
    sums = torch.zeros(5, device=accelerator.device)  # loss, recon, mse, psnr, count
    for batch in val.images.split(cfg.train.batch_size):
        x = normalize(batch.to(accelerator.device))
        with accelerator.autocast():
            out = model(x)
            loss, parts = compute_loss(out, x, cfg.loss, step)
        # MSE and PSNR as `pipeline evaluate` defines them: on [0, 1], PSNR capped per image.
        recon01, x01 = to_unit_range(out.recon), to_unit_range(x)
        n = len(x)
        sums += torch.stack([loss.float() * n, parts["recon"].float() * n,
                             per_image_mse(recon01, x01).sum(),
                             per_image_psnr(recon01, x01).sum(),
                             torch.tensor(float(n), device=x.device)])
    loss_sum, recon_sum, mse_sum, psnr_sum, count = accelerator.reduce(sums, "sum").tolist()
    return {"val/loss": loss_sum / count, "val/recon": recon_sum / count,
            "val/mse": mse_sum / count, "val/psnr": psnr_sum / count,
            "val/mean_image_recon": val.mean_image_recon}


def to_grid(rows: list[Tensor]) -> np.ndarray:
    """Rows of images in [-1, 1] -> one HxWx3 uint8 grid, one row per tensor."""
    from torchvision.utils import make_grid

    images = torch.cat([r.float().clamp(-1, 1) for r in rows]).cpu() * 0.5 + 0.5
    grid = make_grid(images, nrow=len(rows[0]), padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def image_grids(model: nn.Module, val: ValSet, cfg: Config,
                device: torch.device) -> dict[str, np.ndarray]:
    """Fixed val originals over their reconstructions; VAE prior samples from fixed noise."""
    x = normalize(val.images[:NUM_GRID_IMAGES].to(device))
    grids = {"reconstructions": to_grid([x, model(x).recon])}
    if cfg.model.model == "vae":
        noise = torch.Generator(device).manual_seed(cfg.train.seed)  # same draws every time
        grids["prior_samples"] = to_grid([model.sample(NUM_GRID_IMAGES, generator=noise)])
    return grids


# ---------------------------------------------------------------- run setup

def make_accelerator(cfg: Config) -> Accelerator:
    tracker = cfg.tracker.tracker
    # Under torchrun on a machine without CUDA, Accelerate only forms a (gloo) process
    # group when told cpu=True; otherwise every process would train alone.
    launched = int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return Accelerator(cpu=launched and not torch.cuda.is_available(),
                       mixed_precision=cfg.train.mixed_precision,
                       gradient_accumulation_steps=cfg.train.grad_accum,
                       log_with=None if tracker == "none" else tracker,
                       project_config=project_configuration(Path(cfg.train.output)),
                       # Explicit either way: the run's config, not a launcher's
                       # environment (ACCELERATE_DYNAMO_BACKEND), decides compilation.
                       dynamo_backend="inductor" if cfg.train.compile else "no")


def run_record(cfg: Config, accelerator: Accelerator, resume_from: Path | None) -> dict:
    """config.yaml and the tracker config: the resolved config plus how this job ran."""
    world = accelerator.num_processes
    run = {"seed": cfg.train.seed, "world_size": world,
           "global_batch": cfg.train.batch_size * cfg.train.grad_accum * world,
           "device": str(accelerator.device), "resumed_from": str(resume_from or "") or None,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance()}
    return {**yaml.safe_load(to_yaml(cfg)), "run": run}


def prepare_model(cfg: Config, accelerator: Accelerator):
    """Model and AdamW through accelerate.prepare (device, DDP, autocast, compile)."""
    model = build_model(cfg.model)
    if cfg.train.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise PipelineError("--train.sync_bn needs CUDA devices (torch's SyncBatchNorm "
                                "has no CPU kernel); drop it for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    # The EMA copy is taken before prepare: a plain module, without DDP, the autocast
    # forward wrapper or compilation.
    ema = WeightEMA(model, cfg.optim.ema_decay, accelerator.device) if cfg.optim.ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, ema


@dataclass
class Run:
    """What the loop's helpers share; built once in `train`."""
    cfg: Config
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    logger: RunLogger | None  # set once the checkpoint is loaded
    run_dir: Path

    @property
    def module(self) -> nn.Module:
        """The plain AutoEncoder inside DDP and torch.compile (same parameters)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def export_model(self) -> nn.Module:
        """What validation, image grids and exports use: the EMA weights when EMA is on."""
        return self.ema.module if self.ema else self.module

    def write_export(self, folder: Path, step: int) -> None:
        save_pretrained(self.export_model, folder, self.cfg, step,
                        weights="ema" if self.ema else "raw", run_dir=str(self.run_dir))

    def checkpoint(self, state: TrainerState) -> Path:
        return save_checkpoint(self.accelerator, self.run_dir, state, checkpoint_parts(self),
                               lambda folder: self.write_export(folder, state.step),
                               self.cfg.train.keep_last)


def checkpoint_parts(run: Run) -> dict[str, Part]:
    """What a checkpoint's state/ holds besides RNG and the loss scaler, by name: each
    module's weights (unwrapped) and each optimizer's state (None: not in this run). A
    discriminator and its optimizer would be one more line of the table."""
    table: dict[str, Part | None] = {
        "model": run.module, "optimizer": run.optimizer,
        "ema": run.ema.module if run.ema is not None else None,
    }
    return {name: part for name, part in table.items() if part is not None}


def train(cfg: Config, resume_from: Path | None) -> int:
    """Set up, run the loop, and always close the trackers and the process group."""
    limit_threads()
    with StopSignal() as stop:  # from the start: a signal during setup still checkpoints
        accelerator = make_accelerator(cfg)
        lock = None
        try:
            lock = take_run_lock(accelerator, Path(cfg.train.output), resume_from)
            run, state = set_up_run(cfg, accelerator, resume_from)
            return train_loop(run, state, stop)
        finally:
            accelerator.end_training()  # collective: finishes trackers, destroys the group
            release_accelerate_state()
            if lock is not None:
                lock.release()  # last: the trackers have finished writing into RUN_DIR


def take_run_lock(accelerator: Accelerator, run_dir: Path,
                  resume_from: Path | None) -> Lock | None:
    """The main process locks RUN_DIR before anything is written there; every rank learns
    in one all-reduce whether it got the lock, so all of them stop when it did not. With
    the lock held, RUN_DIR must still be as preflight saw it (no job finished meanwhile)."""
    run_dir = Path(run_dir)

    def lock_on_main() -> Lock | None:
        if not accelerator.is_main_process:
            return None
        return acquire(run_dir / LOCK_NAME, f"--output {run_dir}")

    lock = collectively(accelerator, lock_on_main, f"locking --output {run_dir}")
    try:
        collectively(accelerator, lambda: refuse_overwrite(run_dir, resume_from),
                     f"checking --output {run_dir}")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def set_up_run(cfg: Config, accelerator: Accelerator,
               resume_from: Path | None) -> tuple[Run, TrainerState]:
    """Model + optimizer (+ EMA), the checkpoint's state, config.yaml, the tracker run."""
    run_dir = Path(cfg.train.output)
    set_seed(cfg.train.seed)
    record = run_record(cfg, accelerator, resume_from)
    model, optimizer, ema = prepare_model(cfg, accelerator)
    run = Run(cfg, accelerator, model, optimizer, ema, None, run_dir)
    state = TrainerState()
    if resume_from is not None:
        # Every rank reads the same files; one that does not fit stops all of them.
        state = collectively(accelerator, lambda: restore(run, resume_from),
                             f"resuming from {resume_from}")
    if accelerator.is_main_process:
        remove_stale_temporaries(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(record, sort_keys=False))
    accelerator.wait_for_everyone()
    run.logger = RunLogger(accelerator, run_dir, dataclasses.asdict(cfg.tracker), record,
                           state.wandb_run_id, state.step)
    state.wandb_run_id = run.logger.run_id
    accelerator.print(
        f"training {cfg.model.model}-{cfg.model.arch} into {run_dir}: "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, global batch "
        f"{record['run']['global_batch']}, {cfg.train.max_steps} steps"
        + (f"; resuming at step {state.step} from {resume_from}" if resume_from else ""))
    return run, state


def restore(run: Run, checkpoint: Path) -> TrainerState:
    """Weights, optimizer, EMA, scaler and this rank's RNG from a verified checkpoint."""
    load_checkpoint(run.accelerator, checkpoint, checkpoint_parts(run))
    saved_world = read_record(checkpoint)["world_size"]
    if saved_world != run.accelerator.num_processes:
        run.accelerator.print(
            f"{checkpoint} was written by {saved_world} process(es), this job has "
            f"{run.accelerator.num_processes}: random states and loader positions cannot "
            f"continue exactly (ranks without a saved state keep their seeded one)")
    return TrainerState.read(checkpoint)


def release_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons that refuse a second Accelerator with other
    settings (e.g. mixed precision); clearing them lets one process (the demo, the tests)
    run several trainings in a row. The process group is already gone (end_training)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------- the loop

def due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


@contextlib.contextmanager
def rng_neutral(device: torch.device) -> Iterator[None]:
    """Validation and image grids must not move the training random stream: with them
    inside, a resumed run and an uninterrupted one draw the same numbers."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def forward_backward(run: Run, batches: Iterator, window: Window, step: int) -> dict[str, Tensor]:
    """`grad_accum` micro-batches of forward + backward; returns their mean loss terms."""
    cfg, accelerator = run.cfg, run.accelerator
    totals: dict[str, Tensor] = {}
    for _ in range(cfg.train.grad_accum):
        images = window.next_batch(batches).to(accelerator.device, non_blocking=True)
        x = normalize(images, torch.channels_last if cfg.train.channels_last
                      else torch.contiguous_format)
        with accelerator.accumulate(run.model):
            out = run.model(x)
            loss, parts = compute_loss(out, x, cfg.loss, step)
            accelerator.backward(loss)
        for name, value in loss_terms(loss, parts, out).items():
            totals[name] = totals.get(name, 0) + value / cfg.train.grad_accum
    return totals


def optimizer_step(run: Run) -> Tensor:
    """Clip, step, update the EMA; returns the pre-clip global grad norm."""
    max_norm = run.cfg.optim.grad_clip or float("inf")  # inf: measure, do not clip
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.module)
    return grad_norm


def handle_nonfinite(run: Run, state: TrainerState, verdict: Verdict,
                     terms: dict[str, Tensor]) -> None:
    """nan_policy stop: a user-facing error naming the step and term; skip: count it."""
    name = verdict.nonfinite[0]
    value = terms[name].item()
    shown = f"{value}" if not math.isfinite(value) else "non-finite on another rank"
    if run.cfg.train.nan_policy == "stop":
        raise PipelineError(f"non-finite loss at step {state.step}: term {name!r} = {shown}; "
                            f"lower --lr, enable --train.grad_clip, or pass "
                            f"--train.nan_policy skip to skip such steps")
    state.nonfinite_skipped += 1
    if run.accelerator.is_main_process:
        tqdm.write(f"step {state.step}: non-finite {name!r} = {shown}; step skipped "
                   f"({state.nonfinite_skipped} so far)")


def train_metrics(run: Run, state: TrainerState, terms: dict[str, Tensor], lr: float,
                  grad_norm: Tensor | None, window: Window,
                  epoch_size: int | None) -> dict[str, float]:
    """The step's loss terms averaged over ranks, plus lr, grad norm, epoch and throughput."""
    accelerator, cfg = run.accelerator, run.cfg
    names = list(terms)
    values = accelerator.reduce(torch.stack([terms[n].float() for n in names]), "mean").tolist()
    metrics = {n if n.startswith("vq/") else f"train/{n}": v for n, v in zip(names, values)}
    metrics.update({"train/lr": lr, "train/nonfinite_skipped": state.nonfinite_skipped,
                    "train/global_batch": cfg.train.batch_size * cfg.train.grad_accum
                    * accelerator.num_processes})
    if epoch_size:
        metrics["train/epoch"] = fractional_epoch(state, cfg, accelerator.num_processes,
                                                  epoch_size)
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    metrics.update(window.perf(accelerator.num_processes))
    metrics.update(peak_memory_gb(accelerator.device))
    return metrics


def fractional_epoch(state: TrainerState, cfg: Config, world_size: int, epoch_size: int) -> float:
    """Samples consumed over all ranks / samples per epoch (every rank draws the same
    number of batches of `batch_size`)."""
    return state.batches_consumed * cfg.train.batch_size * world_size / epoch_size


def make_train_loader(run: Run, state: TrainerState):
    """The train stream, resumed after the batches this rank already consumed."""
    cfg, accelerator, t = run.cfg, run.accelerator, run.cfg.train
    return make_loader(
        cfg.data.train_shards, t.batch_size, mode="train", num_workers=cfg.data.num_workers,
        seed=t.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        start_batch=state.batches_consumed, shuffle_buffer=cfg.data.shuffle_buffer,
        flip=cfg.data.flip, sampling=cfg.data.sampling, interleave=cfg.data.interleave)


def epoch_size_of(loader, cfg: Config) -> int | None:
    """Samples per epoch over all ranks, when known without extra reading: from the
    manifest, or counted anyway for exact epochs (a resampled stream without a manifest
    would have to read every shard once just for this number)."""
    if loader.manifest is None and cfg.data.sampling != "exact":
        return None
    return loader.epoch_size


def checked_batches(run: Run, batches: Iterator) -> Iterator:
    """The train stream with its first batch checked against the model's image shape on
    every rank, agreed in one all-reduce so that all ranks stop together (shards without
    a manifest state no size; the loader then refuses sizes that differ from the first)."""

    def first_batch():
        batch = next(batches)
        check_batch_shape(batch[0], run.cfg, "--train-shards")
        return batch

    first = collectively(run.accelerator, first_batch, "reading the first training batch")
    return itertools.chain([first], batches)


def evaluate_now(run: Run, val: ValSet, step: int, with_images: bool) -> dict[str, float]:
    """Validation metrics (all ranks) and, when asked, image grids (main process)."""
    model, device = run.export_model, run.accelerator.device
    model.eval()
    with rng_neutral(device):
        metrics = validate(model, val, run.cfg, run.accelerator, step)
        if with_images and run.accelerator.is_main_process:
            run.logger.log_images(image_grids(model, val, run.cfg, device), step, GRID_CAPTIONS)
    run.model.train()
    return metrics


def stop_for_preemption(run: Run, state: TrainerState, signum: int | None) -> int:
    """Checkpoint at the agreed step, leave a marker the SLURM script requeues on."""
    checkpoint = run.checkpoint(state)
    if run.accelerator.is_main_process:
        name = signal.Signals(signum).name if signum else "signal on another rank"
        atomic_write_json(run.run_dir / PREEMPTED_NAME,
                          {"step": state.step, "signal": name, "checkpoint": str(checkpoint)})
        tqdm.write(f"stopped by {name} at step {state.step}; checkpoint {checkpoint}; "
                   f"exit {EXIT_PREEMPTED}: rerun with --resume auto")
    return EXIT_PREEMPTED


def training_step(run: Run, state: TrainerState, batches: Iterator, window: Window,
                  stop: StopSignal) -> tuple[dict[str, Tensor], float, Tensor | None, Verdict]:
    """One optimizer step: lr, `grad_accum` forward/backward passes, the agreement across
    ranks, then clip + step + EMA (or the non-finite policy)."""
    state.step += 1
    lr = get_lr(state.step, run.cfg.optim, run.cfg.train.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    terms = forward_backward(run, batches, window, state.step)
    state.batches_consumed += run.cfg.train.grad_accum
    verdict = agree(run.accelerator, terms, stop_requested=stop.received is not None)
    grad_norm = None
    if verdict.nonfinite:
        handle_nonfinite(run, state, verdict, terms)
    else:
        grad_norm = optimizer_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    return terms, lr, grad_norm, verdict


def train_loop(run: Run, state: TrainerState, stop: StopSignal) -> int:
    cfg, accelerator, t = run.cfg, run.accelerator, run.cfg.train
    if accelerator.is_main_process:
        (run.run_dir / PREEMPTED_NAME).unlink(missing_ok=True)
    val = load_val_set(cfg, accelerator)
    loader = make_train_loader(run, state)
    epoch_size = epoch_size_of(loader, cfg)
    batches = checked_batches(run, iter(loader))
    if state.step == 0:  # the untrained baseline, so curves start somewhere meaningful
        run.logger.log(evaluate_now(run, val, 0, with_images=False), step=0)
    window = Window()
    # Closed however the loop ends, so that an error message starts on a line of its own.
    with tqdm(total=t.max_steps, initial=state.step, desc="train", unit="step",
              disable=not accelerator.is_main_process, dynamic_ncols=True) as bar:
        while state.step < t.max_steps:
            terms, lr, grad_norm, verdict = training_step(run, state, batches, window, stop)
            bar.update(1)

            logging = due(state.step, t.log_every, t.max_steps) or state.step == 1
            metrics = (train_metrics(run, state, terms, lr, grad_norm, window, epoch_size)
                       if logging else {})
            with window.paused():
                with_images = due(state.step, t.image_every, t.max_steps)
                if due(state.step, t.val_every, t.max_steps) or with_images:
                    metrics.update(evaluate_now(run, val, state.step, with_images))
                if metrics:
                    run.logger.log(metrics, state.step)
                if verdict.stop and state.step < t.max_steps:
                    bar.close()
                    return stop_for_preemption(run, state, stop.received)
                if due(state.step, t.ckpt_every, t.max_steps):
                    run.checkpoint(state)
            if logging:
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{lr:.2e}")
                window = Window()
    return 0


if __name__ == "__main__":
    from .cli import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
