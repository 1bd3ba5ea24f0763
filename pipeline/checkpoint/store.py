"""Where checkpoints live in a run directory, how one is written (collectively, atomically),
which one `--resume` continues from, pruning, and the published export `RUN_DIR/model/`.

Every rank writes its RNG files into `checkpoints/.step-<N>.tmp/`; the main process writes
the rest, records sizes and hashes in COMPLETE, then renames the folder to `step-<N>/`.
Each phase ends in one all-reduce of a failure flag (`collectively`), so a write that fails
on any rank (full disk, read-only mount) makes every rank stop together and the temporary
folder is removed: the previous checkpoints stay as they were. Older checkpoints are pruned
only after the rename, so the newest complete one always survives.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig, from_dict, weight_fields
from ..layout import (CHECKPOINTS_DIR, COMPLETE_MARKER, EXPORT_CONFIG_NAME, EXPORT_FILES,
                      MODEL_DIR, STATE_SUBDIR, TRAINER_STATE_NAME, step_dir_name)
from ..utils import PipelineError, atomic_dir
from .state import CheckpointError, Part, TrainerState, note_on_main, write_exact_json, write_state
from .verify import STEP_DIR, trusted_state, write_record

# ---------------------------------------------------------------- finding checkpoints


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / step_dir_name(step)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint with its COMPLETE marker, oldest first (verified or
    not: see `verify_checkpoint`); anything else is ignored."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, run_dir: Path,
                   note: Callable[[str], None] = note_on_main) -> Path | None:
    """`--resume`: None/''/'none' starts fresh; 'auto' takes the newest checkpoint that
    verifies (or starts fresh when there is none, so a requeued job and a first job share
    one command), naming each one it skips; anything else must be a `step-<N>/` directory
    that verifies."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        return newest_verified(run_dir, note)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise PipelineError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE_MARKER} "
                            f"marker); use --resume auto or a {checkpoints_dir(run_dir)}/step-<N> "
                            f"directory")
    try:
        step = trusted_state(path).step
    except CheckpointError as e:
        raise PipelineError(f"--resume {resume}: {e.reason}; resume from another checkpoint "
                            f"(--resume auto takes the newest that verifies)") from None
    newer = [p.name for s, p in complete_checkpoints(run_dir) if s > step]
    if newer:
        # Their steps would interleave with the new ones, and pruning keeps the highest.
        raise PipelineError(f"--resume {resume}: {run_dir} holds newer checkpoints "
                            f"({', '.join(newer)}) of the run being rewound; move them away, "
                            f"or resume into a new --output")
    return path


def newest_verified(run_dir: Path, note: Callable[[str], None] = note_on_main) -> Path | None:
    """The newest checkpoint that verifies; each newer one is named with the reason it
    was skipped. None when there are no checkpoints; an error when none verifies."""
    skipped = []
    for _step, path in reversed(complete_checkpoints(run_dir)):
        try:
            trusted_state(path)
            return path
        except CheckpointError as e:
            skipped.append(f"{path.name}: {e.reason}")
            note(f"--resume auto: skipping {path}: {e.reason}")
    if skipped:
        raise PipelineError(f"--resume auto: no checkpoint in {checkpoints_dir(run_dir)} can be "
                            f"resumed ({'; '.join(skipped)}); move them away, or start the run "
                            f"in a new --output")
    return None


def check_model_matches(checkpoint: Path, model_cfg: ModelConfig) -> None:
    """Refuse to load weights into a different network: say which fields differ. Only the
    fields that shape this run's weights count (`weight_fields`): a codebook size given to
    an AE changes nothing a checkpoint holds."""
    try:
        saved = json.loads((checkpoint / EXPORT_CONFIG_NAME).read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"cannot read the model config of checkpoint {checkpoint}: {e}") from e
    saved_cfg = dataclasses.asdict(from_dict(ModelConfig, saved,
                                             f"{checkpoint}/{EXPORT_CONFIG_NAME}"))
    wanted = dataclasses.asdict(model_cfg)
    diffs = [f"model.{k}: checkpoint {saved_cfg[k]!r}, this run {wanted[k]!r}"
             for k in weight_fields(model_cfg) if saved_cfg.get(k) != wanted[k]]
    if diffs:
        raise PipelineError(f"cannot resume from {checkpoint}: its model differs from this "
                            f"run's ({'; '.join(diffs)}). Use the same model options, or a new "
                            f"--output to start a separate run")


# ---------------------------------------------------------------- all ranks or none

def collectively(accelerator, action: Callable[[], Any], what: str,
                 on_failure: Callable[[], None] | None = None) -> Any:
    """Run `action` on this rank, then agree in one all-reduce whether it failed on any
    rank. If so, every rank raises (the original error where it happened, a PipelineError
    naming `what` elsewhere) after `on_failure` ran: no rank is left waiting at a
    collective the others never reach."""
    error, result = None, None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    flag = torch.tensor([float(error is not None)], device=accelerator.device)
    if accelerator.reduce(flag, reduction="max").item():
        if on_failure is not None:
            on_failure()
        if error is not None:
            raise error
        raise PipelineError(f"{what} failed in another process (its error says why)")
    return result


def on_main_process(accelerator, action: Callable[[], Any], what: str) -> Any:
    """`action()` on the main process only; every process learns in one all-reduce whether
    it failed, and raises then (the main process its own error, the others a PipelineError
    naming `what`). Without this, a failure of the main process alone (a full disk, a held
    lock) would leave the others waiting for it at the next collective until the launcher
    kills them. Every process must call it, in the same order. Returns the main process's
    result (None elsewhere)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
            error = e
    flag = torch.tensor([float(error is not None)], device=accelerator.device)
    failed = accelerator.reduce(flag, reduction="max").item() > 0
    if error is not None:
        raise error
    if failed:
        raise PipelineError(f"the main process failed while {what} (its error is above)")
    return result


# ---------------------------------------------------------------- writing

def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, parts: dict[str, Part],
                    write_export: Callable[[Path], None], keep_last: int) -> Path:
    """Write `step-<state.step>/` atomically; collective: every rank must call it.

    `parts` is the trainer's table of modules and optimizers (name -> object);
    `write_export(folder)` writes `model.safetensors` + `config.json` into `folder` (main
    process only). Returns the final checkpoint directory. A failure on any rank removes
    the temporary folder and raises on every rank.
    """
    final = step_dir(run_dir, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    main = accelerator.is_main_process
    what = f"writing checkpoint {final}"

    def discard() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)

    def start() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_SUBDIR).mkdir(parents=True)

    def finish() -> None:
        if main:
            write_export(tmp)
            write_exact_json(tmp / TRAINER_STATE_NAME, dataclasses.asdict(state))
            write_record(tmp, state.step, accelerator.num_processes)
            # A folder of the same step is a leftover: incomplete, or from the timeline
            # after the step an explicit --resume went back to. Its marker goes first.
            (final / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    def publish() -> None:
        if main:
            publish_export(final, Path(run_dir) / MODEL_DIR)
            prune(run_dir, keep_last)

    collectively(accelerator, start, what, discard)
    collectively(accelerator, lambda: write_state(accelerator, tmp / STATE_SUBDIR, parts),
                 what, discard)
    collectively(accelerator, finish, what, discard)
    collectively(accelerator, publish, f"publishing checkpoint {final}")  # it is complete
    return final


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` complete checkpoints."""
    found = complete_checkpoints(run_dir)
    doomed = [path for _, path in found[:-keep_last]] if keep_last > 0 else []
    for path in doomed:
        # Drop the marker first: a crash mid-delete then leaves a folder resume ignores.
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete `.step-<N>.tmp/` folders a crash left behind (main process, before training)."""
    folder = checkpoints_dir(run_dir)
    stale = sorted(folder.glob(".step-*.tmp")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish_export(checkpoint: Path, model_dir: Path) -> None:
    """Make `RUN_DIR/model/` a copy of the checkpoint's export, replaced in one rename."""
    with atomic_dir(model_dir) as tmp:
        for name in EXPORT_FILES:
            shutil.copy2(checkpoint / name, tmp / name)
