"""Everything a training job sets up before its first step, and takes down after its last.

The RUN_DIR guards (`refuse_if_locked`, `refuse_overwrite`, `take_run_lock`), the
Accelerator, model + AdamW (+ `WeightEMA`) through `accelerator.prepare`, the
discriminator + its Adam through `accelerator.prepare` too (`prepare_discriminator`, with
`--loss.adversarial_weight > 0`), the frozen LPIPS network (`--loss.perceptual_weight > 0`,
beside the model, never prepared), `Run` (what the loop's helpers share), the checkpoint
table `checkpoint_parts`, resume, and `RUN_DIR/config.yaml`. The streaming loader never
goes through `accelerator.prepare`: it owns rank/worker splitting, and prepare would split
the stream a second time.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn

from ..checkpoint import (Part, TrainerState, collectively, complete_checkpoints,
                          load_checkpoint, read_record, remove_stale_temporaries, save_checkpoint)
from ..config import Config, to_yaml
from ..layout import CONFIG_YAML, LOCK_NAME
from ..locking import Lock, acquire, describe_holder, holder_of
from ..models import (Objective, build_discriminator, build_model, compute_loss,
                      load_perceptual, save_pretrained)
from ..tracking import RunLogger, project_configuration
from ..utils import PipelineError, atomic_write_text, available_cpus, provenance
from .ema import WeightEMA

# ---------------------------------------------------------------- RUN_DIR guards


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


# ---------------------------------------------------------------- the process

def limit_threads() -> None:
    """Share this job's cores between the processes of one node; torch would otherwise
    start one thread per core of the whole machine in every process. An explicit
    OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, available_cpus() // local_world_size))


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


def release_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons that refuse a second Accelerator with other
    settings (e.g. mixed precision); clearing them lets one process (the demo, the tests)
    run several trainings in a row. The process group is already gone (end_training)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---------------------------------------------------------------- model, optimizer, run

def prepare_model(cfg: Config, accelerator: Accelerator):
    """Model and AdamW through accelerate.prepare (device, DDP, autocast, compile); under
    DDP the parameters first take their gradients' layouts (`match_grad_layouts`)."""
    model = build_model(cfg.model)
    if cfg.train.compile and cfg.loss.adversarial_weight > 0 and cfg.loss.adaptive_weight:
        # The adaptive weight runs the compiled backward with retain_graph=True
        # (torch.autograd.grad), which a graph that donates its buffers refuses.
        torch._functorch.config.donated_buffer = False
    if cfg.train.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type != "cuda":
            raise PipelineError("--train.sync_bn needs CUDA devices (torch's SyncBatchNorm "
                                "has no CPU kernel); drop it for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if accelerator.num_processes > 1:  # DDP: its gradient buckets follow these layouts
        match_grad_layouts(model, probe_batch(cfg, accelerator.device), accelerator,
                           lambda out, x: compute_loss(out, x, cfg.loss, 1)[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    # The EMA copy is taken before prepare: a plain module, without DDP, the autocast
    # forward wrapper or compilation.
    ema = WeightEMA(model, cfg.optim.ema_decay, accelerator.device) if cfg.optim.ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, ema


def probe_batch(cfg: Config, device: torch.device) -> torch.Tensor:
    """A random batch as the loop hands it to the model: float, in its memory format, of
    the per-device batch size (which picks the convolution kernels, and so the layouts of
    their gradients). Drawn from a generator of its own: the run's RNG stays as seeded."""
    m = cfg.model
    shape = (cfg.train.batch_size, m.in_channels, m.image_size, m.image_size)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return x.to(device).contiguous(memory_format=torch.channels_last if cfg.train.channels_last
                                   else torch.contiguous_format)


def match_grad_layouts(model: nn.Module, x: torch.Tensor, accelerator: Accelerator,
                       loss_of: Callable[[Any, torch.Tensor], torch.Tensor]) -> list[str]:
    """Lay each parameter out as its gradient arrives; returns the names re-laid.

    DDP lays its gradient buckets out like the parameters and warns "Grad strides do not
    match bucket view strides" for a gradient laid out otherwise. A 1x1 conv fed a
    channels-last input (a quantiser's output is a view of its (b h w) x d rows) gets a
    channels-last weight gradient (from the kernels that batch size picks), whose strides
    differ from the contiguous weight's in the size-1 dims only, which autograd's layout
    contract lets through. One training forward + backward of `x` through a copy of the
    model (the model, its buffers and the RNG stay as they are; every rank runs it, so the
    quantisers' collectives match) shows each gradient's strides; a parameter takes them,
    values unchanged."""
    probe = copy.deepcopy(model).to(x.device).train()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        with accelerator.autocast():
            loss = loss_of(probe(x), x)
        loss.backward()
    moved = []
    for (name, param), (_, probed) in zip(model.named_parameters(), probe.named_parameters()):
        if probed.grad is not None and probed.grad.stride() != param.stride():
            relaid = torch.empty_strided(param.shape, probed.grad.stride(), dtype=param.dtype,
                                         device=param.device)
            param.data = relaid.copy_(param.data)
            moved.append(name)
    return moved


def prepare_discriminator(cfg: Config, accelerator: Accelerator):
    """The PatchGAN discriminator and its Adam (constant lr) through accelerate.prepare
    (device, DDP, autocast), or (None, None) without the adversarial loss. Built after
    the model, so the model's initial weights do not depend on it."""
    if cfg.loss.adversarial_weight == 0:
        return None, None
    disc = build_discriminator(cfg.disc, cfg.model.in_channels)
    if cfg.disc.norm == "batch" and cfg.train.sync_bn and accelerator.num_processes > 1:
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)  # prepare_model checked CUDA
    if cfg.train.channels_last:
        disc = disc.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(disc.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas)
    return accelerator.prepare(disc, optimizer)


def make_objective(cfg: Config, accelerator: Accelerator, disc: nn.Module | None) -> Objective:
    """The perceptual and adversarial terms. The LPIPS files are read on every rank; one
    that cannot read them stops all (the error names the --loss option)."""
    perceptual = collectively(accelerator, lambda: load_perceptual(cfg.loss),
                              "loading the LPIPS network")
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    plain_disc = None if disc is None else accelerator.unwrap_model(disc,
                                                                    keep_torch_compile=False)
    return Objective(cfg.loss, perceptual, plain_disc)


def describe_objective(cfg: Config) -> str:
    """One line naming the loss terms this run trains with."""
    loss = cfg.loss
    terms = [loss.recon]
    if loss.perceptual_weight > 0:
        terms.append(f"{loss.perceptual_weight:g} LPIPS({loss.lpips_net})")
    if loss.adversarial_weight > 0:
        weight = "adaptive" if loss.adaptive_weight else "fixed"
        terms.append(f"{loss.adversarial_weight:g} x {weight} {loss.disc_loss} PatchGAN "
                     f"({cfg.disc.layers} layers, {cfg.disc.norm} norm) from step "
                     f"{loss.disc_start + 1}")
    return " + ".join(terms)


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
    disc: nn.Module | None = None                       # prepared (DDP) discriminator
    disc_optimizer: torch.optim.Optimizer | None = None
    objective: Objective | None = None                  # perceptual + adversarial terms

    @property
    def module(self) -> nn.Module:
        """The plain AutoEncoder inside DDP and torch.compile (same parameters)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def disc_module(self) -> nn.Module | None:
        """The plain discriminator inside DDP and torch.compile (same parameters)."""
        if self.disc is None:
            return None
        return self.accelerator.unwrap_model(self.disc, keep_torch_compile=False)

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
    module's weights (unwrapped) and each optimizer's state (None: not in this run). The
    export (`write_export`) is the autoencoder alone: never the discriminator."""
    table: dict[str, Part | None] = {
        "model": run.module, "optimizer": run.optimizer,
        "ema": run.ema.module if run.ema is not None else None,
        "discriminator": run.disc_module, "disc_optimizer": run.disc_optimizer,
    }
    return {name: part for name, part in table.items() if part is not None}


def run_record(cfg: Config, accelerator: Accelerator, resume_from: Path | None) -> dict:
    """config.yaml and the tracker config: the resolved config plus how this job ran."""
    world = accelerator.num_processes
    run = {"seed": cfg.train.seed, "world_size": world,
           "global_batch": cfg.train.batch_size * cfg.train.grad_accum * world,
           "device": str(accelerator.device), "resumed_from": str(resume_from or "") or None,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **provenance()}
    return {**yaml.safe_load(to_yaml(cfg)), "run": run}


def set_up_run(cfg: Config, accelerator: Accelerator,
               resume_from: Path | None) -> tuple[Run, TrainerState]:
    """Model + optimizer (+ EMA, + discriminator and its optimizer, + LPIPS), the
    checkpoint's state, config.yaml, the tracker run."""
    run_dir = Path(cfg.train.output)
    set_seed(cfg.train.seed)
    record = run_record(cfg, accelerator, resume_from)
    model, optimizer, ema = prepare_model(cfg, accelerator)
    disc, disc_optimizer = prepare_discriminator(cfg, accelerator)
    run = Run(cfg, accelerator, model, optimizer, ema, None, run_dir, disc=disc,
              disc_optimizer=disc_optimizer, objective=make_objective(cfg, accelerator, disc))
    state = TrainerState()
    if resume_from is not None:
        # Every rank reads the same files; one that does not fit stops all of them.
        state = collectively(accelerator, lambda: restore(run, resume_from),
                             f"resuming from {resume_from}")
    if accelerator.is_main_process:
        remove_stale_temporaries(run_dir)
        atomic_write_text(run_dir / CONFIG_YAML, yaml.safe_dump(record, sort_keys=False))
    accelerator.wait_for_everyone()
    run.logger = RunLogger(accelerator, run_dir, dataclasses.asdict(cfg.tracker), record,
                           state.wandb_run_id, state.step)
    state.wandb_run_id = run.logger.run_id
    accelerator.print(
        f"training {cfg.model.model}-{cfg.model.arch} into {run_dir}: "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}, global batch "
        f"{record['run']['global_batch']}, {cfg.train.max_steps} steps; loss "
        f"{describe_objective(cfg)}"
        + (f"; resuming at step {state.step} from {resume_from}" if resume_from else ""))
    return run, state


def restore(run: Run, checkpoint: Path) -> TrainerState:
    """Weights, optimizer, EMA, discriminator and its optimizer, scaler and this rank's
    RNG from a verified checkpoint."""
    load_checkpoint(run.accelerator, checkpoint, checkpoint_parts(run))
    saved_world = read_record(checkpoint)["world_size"]
    if saved_world != run.accelerator.num_processes:
        run.accelerator.print(
            f"{checkpoint} was written by {saved_world} process(es), this job has "
            f"{run.accelerator.num_processes}: random states and loader positions cannot "
            f"continue exactly (ranks without a saved state keep their seeded one)")
    return TrainerState.read(checkpoint)
