"""Training checkpoints under `RUN_DIR/checkpoints/step-<N>/`, written so that a crash at any
moment never leaves a checkpoint that `--resume auto` would pick up half-written.

Layout of one checkpoint::

    step-<N>/state/            accelerator.save_state: weights, optimizer, scaler, RNG of
                               every rank, registered objects (the EMA)
    step-<N>/model.safetensors the export (EMA weights when EMA is on) + config.json:
    step-<N>/config.json       `from_pretrained(step-<N>/)` evaluates it without the state
    step-<N>/trainer.json      step, batches consumed per rank, W&B run id, skipped steps
    step-<N>/COMPLETE          written last: only directories holding it are checkpoints

The Accelerate state lives in its own subfolder because `save_state` names its weight file
`model.safetensors` too; sharing the folder would let the export overwrite it.

Every rank writes into `checkpoints/.step-<N>.tmp/`; the main process adds the export, the
trainer state and the marker, then renames the folder to `step-<N>/`. Older checkpoints are
pruned only after that rename, so the newest complete one always survives. Accelerate's own
`total_limit` is not used: it only understands its `checkpoint_<i>` naming.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ModelConfig, from_dict
from .utils import PipelineError, atomic_dir, atomic_write_json, atomic_write_text

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_NAME = "trainer.json"
STATE_SUBDIR = "state"
EXPORT_FILES = ("model.safetensors", "config.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """What the loop needs besides the Accelerate state to continue exactly."""
    step: int = 0                   # optimizer steps done (skipped non-finite steps count)
    batches_consumed: int = 0       # batches each rank has drawn from the train stream
    wandb_run_id: str | None = None
    nonfinite_skipped: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState":
        path = checkpoint / TRAINER_STATE_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PipelineError(f"cannot read {path}: {e}; resume from another checkpoint "
                                f"with --resume {checkpoint.parent}/step-<N>") from e
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first; anything else is ignored."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`--resume`: None/'' starts fresh; 'auto' takes the newest complete checkpoint (or
    starts fresh when there is none, so a requeued job and a first job share one command);
    anything else must be a complete `step-<N>/` directory."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise PipelineError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE_MARKER} "
                            f"marker); use --resume auto or a {checkpoints_dir(run_dir)}/step-<N> "
                            f"directory")
    step = TrainerState.read(path).step
    newer = [p.name for s, p in complete_checkpoints(run_dir) if s > step]
    if newer:
        # Their steps would interleave with the new ones, and pruning keeps the highest.
        raise PipelineError(f"--resume {resume}: {run_dir} holds newer checkpoints "
                            f"({', '.join(newer)}) of the run being rewound; move them away, "
                            f"or resume into a new --output")
    return path


def check_model_matches(checkpoint: Path, model_cfg: ModelConfig) -> None:
    """Refuse to load weights into a different network: say which fields differ."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text())["model"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise PipelineError(f"cannot read the model config of checkpoint {checkpoint}: {e}") from e
    saved_cfg = dataclasses.asdict(from_dict(ModelConfig, saved, f"{checkpoint}/config.json"))
    wanted = dataclasses.asdict(model_cfg)
    diffs = [f"model.{k}: checkpoint {saved_cfg[k]!r}, this run {wanted[k]!r}"
             for k in wanted if saved_cfg.get(k) != wanted[k]]
    if diffs:
        raise PipelineError(f"cannot resume from {checkpoint}: its model differs from this "
                            f"run's ({'; '.join(diffs)}). Use the same model options, or a new "
                            f"--output to start a separate run")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete `.step-<N>.tmp/` folders a crash left behind (main process, before training)."""
    folder = checkpoints_dir(run_dir)
    stale = sorted(folder.glob(".step-*.tmp")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints."""
    found = complete_checkpoints(run_dir)
    doomed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        # Drop the marker first: a crash mid-delete then leaves a folder resume ignores.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState,
                    write_export: Callable[[Path], None], keep_last: int) -> Path:
    """Write `step-<state.step>/` atomically; collective: every rank must call it.

    `write_export(folder)` writes `model.safetensors` + `config.json` into `folder` (main
    process only). Returns the final checkpoint directory.
    """
    final = step_dir(run_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_SUBDIR))
    accelerator.wait_for_everyone()  # every rank's RNG file is on disk before the marker
    if accelerator.is_main_process:
        write_export(tmp)
        atomic_write_json(tmp / TRAINER_STATE_NAME, dataclasses.asdict(state))
        atomic_write_text(tmp / COMPLETE_MARKER, f"step {state.step}\n")
        # A folder of the same step is a leftover: incomplete, or from the timeline after
        # the step an explicit --resume went back to. Its marker goes first, as in prune.
        (final / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        publish_export(final, Path(run_dir) / "model")
        prune(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def publish_export(checkpoint: Path, model_dir: Path) -> None:
    """Make `RUN_DIR/model/` a copy of the checkpoint's export, replaced in one rename."""
    with atomic_dir(model_dir) as tmp:
        for name in EXPORT_FILES:
            shutil.copy2(checkpoint / name, tmp / name)

