"""The training loop, top to bottom: `train` sets up and always takes down; `train_loop`
is the loop; the helpers below it are its steps.

Each step draws `grad_accum` batches, runs forward + backward (with the adversarial loss
also the discriminator's forward + backward on the same batch), agrees across ranks on
"stop?" and "non-finite?" with one tiny all-reduce (`signals.agree`), then clips, steps
and updates the EMA; logging, validation, image grids and checkpoints follow when their
step comes. The learning rate is a pure function of the step (`get_lr`), so the
schedule's whole state is the step stored in each checkpoint.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from ..checkpoint import TrainerState, collectively
from ..config import Config, OptimConfig
from ..data import CachedLoader, fill_cache, make_loader, normalize, plan_cache
from ..layout import PREEMPTED_NAME
from ..models import compute_loss
from ..utils import PipelineError
from .setup import (Run, limit_threads, make_accelerator, release_accelerate_state,
                    set_up_run, take_run_lock)
from .signals import StopSignal, Verdict, agree, stop_for_preemption
from .validation import check_batch_shape, evaluate_now, load_val_set


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
            result = training_step(run, state, batches, window, stop)
            bar.update(1)

            logging = due(state.step, t.log_every, t.max_steps) or state.step == 1
            metrics = train_metrics(run, state, result, window, epoch_size) if logging else {}
            with window.paused():
                with_images = due(state.step, t.image_every, t.max_steps)
                if due(state.step, t.val_every, t.max_steps) or with_images:
                    metrics.update(evaluate_now(run, val, state.step, with_images))
                if metrics:
                    run.logger.log(metrics, state.step)
                if result.verdict.stop and state.step < t.max_steps:
                    bar.close()
                    return stop_for_preemption(run, state, stop.received)
                if due(state.step, t.ckpt_every, t.max_steps):
                    run.checkpoint(state)
            if logging:
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{result.lr:.2e}")
                window = Window()
    return 0


# ---------------------------------------------------------------- one step

@dataclass
class StepResult:
    """What one optimizer step leaves for the log."""
    losses: dict[str, Tensor]  # loss terms ("loss" = the total), mean over micro-batches
    stats: dict[str, Tensor]   # the model's `logged_stats`, under their final names
    lr: float
    grad_norm: Tensor | None   # None: the step was skipped (non-finite)
    verdict: Verdict
    disc_grad_norm: Tensor | None = None  # None: no discriminator step


def training_step(run: Run, state: TrainerState, batches: Iterator, window: "Window",
                  stop: StopSignal) -> StepResult:
    """One optimizer step: lr, `grad_accum` forward/backward passes, the agreement across
    ranks, then clip + step + EMA (or the non-finite policy). From step
    `--loss.disc_start + 1` on, the discriminator steps with the autoencoder."""
    state.step += 1
    lr = get_lr(state.step, run.cfg.optim, run.cfg.train.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    adversarial = run.objective is not None and run.objective.adversarial_at(state.step)
    losses, stats = forward_backward(run, batches, window, state.step)
    state.batches_consumed += run.cfg.train.grad_accum
    verdict = agree(run.accelerator, losses, stop_requested=stop.received is not None)
    grad_norm = disc_grad_norm = None
    if verdict.nonfinite:
        handle_nonfinite(run, state, verdict, losses)
    elif adversarial:
        grad_norm, disc_grad_norm = optimizer_step_with_discriminator(run)
    else:
        grad_norm = optimizer_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    if run.disc_optimizer is not None:
        run.disc_optimizer.zero_grad(set_to_none=True)
    return StepResult(losses, stats, lr, grad_norm, verdict, disc_grad_norm)


def forward_backward(run: Run, batches: Iterator, window: "Window",
                     step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`grad_accum` micro-batches of forward + backward; returns the mean of their loss
    terms and the mean of the stats the model asks to log.

    With the adversarial loss active at `step`, each micro-batch also runs the
    discriminator's loss on the same real images and (detached) reconstructions and its
    backward; `accelerator.accumulate` then covers both models (no gradient all-reduce
    before the last micro-batch, for either)."""
    cfg, accelerator, module = run.cfg, run.accelerator, run.module
    objective = run.objective
    adversarial = objective is not None and objective.adversarial_at(step)
    models = (run.model, run.disc) if adversarial else (run.model,)
    losses: dict[str, Tensor] = {}
    stats: dict[str, Tensor] = {}
    for _ in range(cfg.train.grad_accum):
        images = window.next_batch(batches).to(accelerator.device, non_blocking=True)
        x = normalize(images, torch.channels_last if cfg.train.channels_last
                      else torch.contiguous_format)
        with accelerator.accumulate(*models):
            out = run.model(x)
            loss, parts = compute_loss(out, x, cfg.loss, step)
            if objective is not None:
                loss, parts = objective.add_generator_terms(
                    module, out, x, loss, parts, step,
                    mean_over_ranks=mean_over_ranks(accelerator) if adversarial else None,
                    loss_scale=loss_scale(run) if adversarial else None)
            accelerator.backward(loss)
            if adversarial:
                d_loss, d_parts = objective.discriminator_loss(run.disc, x, out.recon)
                accelerator.backward(d_loss)
                parts.update(d_parts)
        add_mean(losses, loss_terms(loss, parts), cfg.train.grad_accum)
        add_mean(stats, module.logged_stats(out.stats), cfg.train.grad_accum)
    return losses, stats


def mean_over_ranks(accelerator):
    """An all-reduce mean across ranks for the adaptive weight's gradients (None alone)."""
    if accelerator.num_processes == 1:
        return None
    return lambda tensor: accelerator.reduce(tensor, "mean")


def loss_scale(run: Run) -> Tensor | None:
    """The fp16 loss scale as a tensor (no host sync), None without loss scaling."""
    scaler = run.accelerator.scaler
    if scaler is None:
        return None
    return scaler.scale(torch.ones((), device=run.accelerator.device))


def loss_terms(loss: Tensor, parts: dict[str, Any]) -> dict[str, Tensor]:
    """The total and every part of one micro-batch's loss, as detached float tensors."""
    terms = {"loss": loss.detach()}
    terms.update({name: torch.as_tensor(value, device=loss.device).detach().float()
                  for name, value in sorted(parts.items())})
    return terms


def add_mean(totals: dict[str, Tensor], values: dict[str, Tensor], count: int) -> None:
    for name, value in values.items():
        totals[name] = totals.get(name, 0) + value / count


def optimizer_step(run: Run) -> Tensor:
    """Clip, step, update the EMA; returns the pre-clip global grad norm."""
    max_norm = run.cfg.optim.grad_clip or float("inf")  # inf: measure, do not clip
    grad_norm = run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(run.module)
    return grad_norm


def optimizer_step_with_discriminator(run: Run) -> tuple[Tensor, Tensor]:
    """Clip and step the autoencoder and the discriminator, update the EMA; returns both
    pre-clip grad norms (the discriminator is clipped only with --disc.grad_clip)."""
    cfg = run.cfg
    grad_norm, disc_grad_norm = step_together(run.accelerator.scaler, [
        (run.optimizer, list(run.model.parameters()), cfg.optim.grad_clip or float("inf")),
        (run.disc_optimizer, list(run.disc.parameters()), cfg.disc.grad_clip or float("inf"))])
    if run.ema is not None:
        run.ema.update(run.module)
    return grad_norm, disc_grad_norm


def step_together(scaler, groups: list[tuple[torch.optim.Optimizer, list[Tensor], float]]
                  ) -> list[Tensor]:
    """Unscale, clip and step each (optimizer, parameters, max_norm) group, then update the
    fp16 loss scale once; returns each group's pre-clip grad norm.

    PyTorch's recipe for several optimizers on one GradScaler. Accelerate's own calls do
    not compose for two: its `clip_grad_norm_` unscales every prepared optimizer, and its
    `optimizer.step()` calls `scaler.update()` after each one, which forgets which
    optimizers were unscaled (the second one's gradients would be divided by the scale
    twice) and may change the scale between the two steps. Without a scaler this is
    clip + step of each."""
    norms = []
    for optimizer, params, max_norm in groups:
        if scaler is not None:
            scaler.unscale_(_inner(optimizer))
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
    for optimizer, _params, _max_norm in groups:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(_inner(optimizer))  # skips an optimizer with inf/nan gradients
    if scaler is not None:
        scaler.update()
    return norms


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's AcceleratedOptimizer (itself otherwise)."""
    return getattr(optimizer, "optimizer", optimizer)


def handle_nonfinite(run: Run, state: TrainerState, verdict: Verdict,
                     losses: dict[str, Tensor]) -> None:
    """nan_policy stop: a user-facing error naming the step and term; skip: count it."""
    name = verdict.nonfinite[0]
    value = losses[name].item()
    shown = f"{value}" if not math.isfinite(value) else "non-finite on another rank"
    if run.cfg.train.nan_policy == "stop":
        raise PipelineError(f"non-finite loss at step {state.step}: term {name!r} = {shown}; "
                            f"lower --lr, enable --train.grad_clip, or pass "
                            f"--train.nan_policy skip to skip such steps")
    state.nonfinite_skipped += 1
    if run.accelerator.is_main_process:
        tqdm.write(f"step {state.step}: non-finite {name!r} = {shown}; step skipped "
                   f"({state.nonfinite_skipped} so far)")


def get_lr(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio`
    at `max_steps`. `step` counts from 1."""
    if step <= optim.warmup_steps:
        return optim.lr * step / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine)


def due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


# ---------------------------------------------------------------- what gets logged

def train_metrics(run: Run, state: TrainerState, result: StepResult, window: "Window",
                  epoch_size: int | None) -> dict[str, float]:
    """The step's loss terms (as `train/<term>`) and the model's stats (as named) averaged
    over ranks, plus lr, grad norm, epoch and throughput."""
    accelerator, cfg = run.accelerator, run.cfg
    named = {**{f"train/{n}": v for n, v in result.losses.items()}, **result.stats}
    values = accelerator.reduce(torch.stack([v.float() for v in named.values()]), "mean")
    metrics = dict(zip(named, values.tolist()))
    metrics.update({"train/lr": result.lr, "train/nonfinite_skipped": state.nonfinite_skipped,
                    "train/global_batch": cfg.train.batch_size * cfg.train.grad_accum
                    * accelerator.num_processes})
    if epoch_size:
        metrics["train/epoch"] = fractional_epoch(state, cfg, accelerator.num_processes,
                                                  epoch_size)
    if result.grad_norm is not None:
        metrics["train/grad_norm"] = float(result.grad_norm)
    if result.disc_grad_norm is not None:
        metrics["train/d_grad_norm"] = float(result.disc_grad_norm)
    metrics.update(window.perf(accelerator.num_processes))
    metrics.update(peak_memory_gb(accelerator.device))
    return metrics


def fractional_epoch(state: TrainerState, cfg: Config, world_size: int, epoch_size: int) -> float:
    """Samples consumed over all ranks / samples per epoch (every rank draws the same
    number of batches of `batch_size`)."""
    return state.batches_consumed * cfg.train.batch_size * world_size / epoch_size


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


# ---------------------------------------------------------------- the train stream

def make_train_loader(run: Run, state: TrainerState):
    """The train stream (or with --data.cache the cached part of this rank), resumed
    after the batches this rank already consumed."""
    cfg, accelerator, t = run.cfg, run.accelerator, run.cfg.train
    if cfg.data.cache != "none":
        return make_cached_train_loader(run, state)
    return make_loader(
        cfg.data.train_shards, t.batch_size, mode="train", num_workers=cfg.data.num_workers,
        seed=t.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        start_batch=state.batches_consumed, shuffle_buffer=cfg.data.shuffle_buffer,
        flip=cfg.data.flip, sampling=cfg.data.sampling, interleave=cfg.data.interleave)


def make_cached_train_loader(run: Run, state: TrainerState) -> CachedLoader:
    """This rank's part of the train shards read once into GPU or host memory. All ranks
    agree that every part fits before any rank reads, and a rank that fails to read its
    part stops all of them."""
    cfg, accelerator = run.cfg, run.accelerator
    plan = collectively(accelerator, lambda: plan_cache(
        cfg.data.train_shards, cfg.data.cache, accelerator.device,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        image_size=cfg.model.image_size), f"planning --data.cache {cfg.data.cache}")
    cache = collectively(accelerator, lambda: fill_cache(
        plan, cfg.data.num_workers, progress=accelerator.is_main_process),
        f"filling --data.cache {cfg.data.cache}")
    return CachedLoader(cache, cfg.train.batch_size, seed=cfg.train.seed, rank=plan.rank,
                        start_batch=state.batches_consumed, flip=cfg.data.flip,
                        device=plan.device)


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
