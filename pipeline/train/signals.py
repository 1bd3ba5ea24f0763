"""Stopping together: SIGTERM / SIGUSR1 set a flag, and one all-reduce per step lets every
rank agree on "stop?" and "non-finite?", so all ranks take the same branch at the same step.

A stop writes a checkpoint at the agreed step, leaves `RUN_DIR/preempted.json` and exits
with `EXIT_PREEMPTED` (75, EX_TEMPFAIL): launch/slurm.sbatch requeues on either, and the
same command with `--resume auto` continues.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm import tqdm

from ..checkpoint import TrainerState
from ..layout import PREEMPTED_NAME
from ..utils import atomic_write_json

if TYPE_CHECKING:
    from .setup import Run

EXIT_PREEMPTED = 75      # EX_TEMPFAIL: "try again"; launch/slurm.sbatch requeues on it


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


def agree(accelerator: Accelerator, losses: dict[str, Tensor], stop_requested: bool) -> Verdict:
    """One all-reduce(max) per step of [stop flag, one non-finite flag per loss term]: every
    rank learns whether any rank was signalled or saw a nan/inf, and takes the same branch."""
    # The total comes last so that a message names the term that went bad first.
    names = [n for n in losses if n != "loss"] + ["loss"]
    flags = torch.stack([torch.tensor(float(stop_requested), device=losses["loss"].device),
                         *[(~torch.isfinite(losses[n])).float() for n in names]])
    flags = accelerator.reduce(flags, reduction="max").tolist()
    return Verdict(bool(flags[0]), [n for n, f in zip(names, flags[1:]) if f])


def stop_for_preemption(run: "Run", state: TrainerState, signum: int | None) -> int:
    """Checkpoint at the agreed step, leave a marker the SLURM script requeues on."""
    checkpoint = run.checkpoint(state)
    if run.accelerator.is_main_process:
        name = signal.Signals(signum).name if signum else "signal on another rank"
        atomic_write_json(run.run_dir / PREEMPTED_NAME,
                          {"step": state.step, "signal": name, "checkpoint": str(checkpoint)})
        tqdm.write(f"stopped by {name} at step {state.step}; checkpoint {checkpoint}; "
                   f"exit {EXIT_PREEMPTED}: rerun with --resume auto")
    return EXIT_PREEMPTED
