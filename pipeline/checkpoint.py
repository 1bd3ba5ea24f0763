"""Training checkpoints under `RUN_DIR/checkpoints/step-<N>/`: written so that a crash or a
full disk at any moment never leaves a checkpoint that `--resume auto` would pick up
half-written, verified before they are trusted, and read without unpickling anything.

Layout of one checkpoint (format 2)::

    step-<N>/model.safetensors        the export (EMA weights when EMA is on) + config.json:
    step-<N>/config.json              `from_pretrained(step-<N>/)` evaluates it without the state
    step-<N>/trainer.json             step, batches consumed per rank, W&B run id, skipped steps
    step-<N>/state/<module>.safetensors     weights of each module of the trainer's table
                                      (`model`: the live weights, `ema`: the weight EMA)
    step-<N>/state/<optimizer>.safetensors  an optimizer's state tensors, and beside it
    step-<N>/state/<optimizer>.json         its param_groups and non-tensor state values
    step-<N>/state/accelerator.json   Accelerate's micro-step counter and the fp16 GradScaler
    step-<N>/state/rng-<r>.safetensors      RNG of rank r: torch CPU and CUDA generators,
    step-<N>/state/rng-<r>.json             numpy's and Python's `random` state
    step-<N>/COMPLETE                 written last: {"format", "step", "world_size", "files":
                                      {name: {"size", "sha256"}}} of every other file

Only safetensors and JSON: nothing on the resume path unpickles (Accelerate's
`save_state` stores optimizer, RNG and registered objects as pickles, and reads the last
ones with `weights_only=False`). The state lives in its own subfolder so that the trainer's
`model` weights never collide with the export's `model.safetensors`.

Every rank writes its RNG files into `checkpoints/.step-<N>.tmp/`; the main process writes
the rest, records sizes and hashes in COMPLETE, then renames the folder to `step-<N>/`.
Each phase ends in one all-reduce of a failure flag, so a write that fails on any rank
(full disk, read-only mount) makes every rank stop together and the temporary folder is
removed: the previous checkpoints stay as they were. Older checkpoints are pruned only
after the rename, so the newest complete one always survives.

`verify_checkpoint` checks a checkpoint against its COMPLETE (names, sizes, sha256, file
formats, no file it does not list) before resume trusts it; `--resume auto` falls back to
the newest one that verifies. Checkpoints of the previous format (Accelerate's pickles,
COMPLETE without hashes) are refused: they cannot be read without unpickling.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .config import ModelConfig, from_dict
from .utils import PipelineError, atomic_dir, atomic_write_bytes, atomic_write_text, sha256_file

CHECKPOINT_FORMAT = 2
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE_NAME = "trainer.json"
STATE_SUBDIR = "state"
ACCELERATOR_STATE_NAME = "accelerator.json"
EXPORT_FILES = ("model.safetensors", "config.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PART_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Every file name a checkpoint of this format may hold (COMPLETE's names are data).
_CHECKPOINT_FILE = re.compile(r"^(trainer\.json|config\.json|model\.safetensors|"
                              r"state/[a-z][a-z0-9_-]*\.(safetensors|json))$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REQUIRED_FILES = (TRAINER_STATE_NAME, *EXPORT_FILES, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}")

# What a checkpoint stores of a trainer object: a module's weights, or an optimizer's state.
Part = nn.Module | torch.optim.Optimizer


class CheckpointError(PipelineError):
    """A checkpoint that must not be trusted; `reason` says why in one line."""

    def __init__(self, checkpoint: Path, reason: str):
        super().__init__(f"checkpoint {checkpoint}: {reason}")
        self.checkpoint, self.reason = checkpoint, reason


@dataclass
class TrainerState:
    """What the loop needs besides weights, optimizer and RNG to continue exactly."""
    step: int = 0                   # optimizer steps done (skipped non-finite steps count)
    batches_consumed: int = 0       # batches each rank has drawn from the train stream
    wandb_run_id: str | None = None
    nonfinite_skipped: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainerState":
        """The checkpoint's trainer.json, every value checked (it names a W&B run folder)."""
        data = _read_json(checkpoint, TRAINER_STATE_NAME)
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        counts = {"step": state.step, "batches_consumed": state.batches_consumed,
                  "nonfinite_skipped": state.nonfinite_skipped}
        for name, value in counts.items():
            if not _is_count(value):
                raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME}: {name} must be an "
                                                  f"integer >= 0, got {value!r}")
        run_id = state.wandb_run_id
        if run_id is not None and not (isinstance(run_id, str) and _WANDB_ID.match(run_id)):
            raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME}: wandb_run_id {run_id!r} "
                                              f"is not a W&B run id (letters, digits, - and _)")
        return state


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_json(checkpoint: Path, name: str) -> dict[str, Any]:
    path = checkpoint / name
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(checkpoint, f"cannot read {name}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(checkpoint, f"{name} is not a JSON object")
    return data


# ---------------------------------------------------------------- finding checkpoints

def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint with its COMPLETE marker, oldest first (verified or
    not: see `verify_checkpoint`); anything else is ignored."""
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


def note_on_main(message: str) -> None:
    """One line on stderr from the main process only: preflight runs in every rank, before
    Accelerate exists, so the rank comes from the launcher's environment."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


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


def trusted_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a checkpoint that verifies, and whose trainer.json agrees with
    COMPLETE on the step; CheckpointError otherwise."""
    record = verify_checkpoint(checkpoint)
    state = TrainerState.read(checkpoint)
    if state.step != record["step"]:
        raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME} is at step {state.step}, "
                                          f"{COMPLETE_MARKER} at step {record['step']}")
    return state


def check_model_matches(checkpoint: Path, model_cfg: ModelConfig) -> None:
    """Refuse to load weights into a different network: say which fields differ."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"cannot read the model config of checkpoint {checkpoint}: {e}") from e
    saved_cfg = dataclasses.asdict(from_dict(ModelConfig, saved, f"{checkpoint}/config.json"))
    wanted = dataclasses.asdict(model_cfg)
    diffs = [f"model.{k}: checkpoint {saved_cfg[k]!r}, this run {wanted[k]!r}"
             for k in wanted if saved_cfg.get(k) != wanted[k]]
    if diffs:
        raise PipelineError(f"cannot resume from {checkpoint}: its model differs from this "
                            f"run's ({'; '.join(diffs)}). Use the same model options, or a new "
                            f"--output to start a separate run")


# ---------------------------------------------------------------- verification

def read_record(checkpoint: Path) -> dict[str, Any]:
    """COMPLETE, parsed and checked: format, step, world size, and a size and sha256 for
    each file name (names are data: only this format's file names are accepted)."""
    try:
        text = (checkpoint / COMPLETE_MARKER).read_text()
        record = json.loads(text)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or "format" not in record:
        raise CheckpointError(checkpoint, legacy_reason(checkpoint))
    if record["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} has format {record['format']!r}; "
                                          f"this trainer reads format {CHECKPOINT_FORMAT}")
    files, step, world = record.get("files"), record.get("step"), record.get("world_size")
    if not (isinstance(files, dict) and _is_count(step) and _is_count(world) and world >= 1):
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} lacks its step, world_size or "
                                          f"file list")
    match = _STEP_DIR.match(checkpoint.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} records step {step}, but the "
                                          f"folder is {checkpoint.name}")
    for name, entry in files.items():
        if not _CHECKPOINT_FILE.match(name):
            raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} lists {name!r}, which is not "
                                              f"a file this trainer writes")
        if not (isinstance(entry, dict) and _is_count(entry.get("size"))
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
            raise CheckpointError(checkpoint, f"{COMPLETE_MARKER}: no valid size and sha256 "
                                              f"for {name}")
    rng = [f"{STATE_SUBDIR}/rng-{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")]
    missing = [name for name in (*REQUIRED_FILES, *rng) if name not in files]
    if missing:
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} does not list {', '.join(missing)}")
    return record


def legacy_reason(checkpoint: Path) -> str:
    return (f"written by an earlier version of `pipeline train` ({COMPLETE_MARKER} without "
            f"file hashes, Accelerate's pickled state in {STATE_SUBDIR}/): it cannot be "
            f"resumed without unpickling. Its export still evaluates "
            f"(`pipeline evaluate {checkpoint}`); continue training in a new --output")


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Check every file against COMPLETE before anything is loaded: present, a plain file,
    the recorded size and sha256, a readable safetensors header or JSON object, and no
    file that COMPLETE does not list. Raises CheckpointError naming the first bad file;
    returns the record."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    listed = record["files"]
    for name in sorted(listed):
        _verify_file(checkpoint, name, listed[name])
    unlisted = sorted(set(_files_under(checkpoint)) - set(listed) - {COMPLETE_MARKER})
    if unlisted:
        raise CheckpointError(checkpoint, f"{unlisted[0]} is not recorded in {COMPLETE_MARKER} "
                                          f"(a file added after the save; this trainer never "
                                          f"reads pickle files)")
    return record


def _verify_file(checkpoint: Path, name: str, entry: dict[str, Any]) -> None:
    path = checkpoint / name
    if any(p.is_symlink() for p in (path, path.parent)) or not path.is_file():
        raise CheckpointError(checkpoint, f"{name} is missing (or not a plain file)")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(checkpoint, f"{name} has {size} bytes, {COMPLETE_MARKER} recorded "
                                          f"{entry['size']} (truncated or damaged)")
    if sha256_file(path) != entry["sha256"]:
        raise CheckpointError(checkpoint, f"{name} does not match its sha256 in "
                                          f"{COMPLETE_MARKER} (damaged or replaced)")
    if name.endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(checkpoint, f"{name} is not a safetensors file ({e})") from None
    else:
        _read_json(checkpoint, name)


def _files_under(checkpoint: Path) -> list[str]:
    """Relative names of everything but directories below `checkpoint` (links included,
    never followed)."""
    names = []
    for folder, dirs, files in os.walk(checkpoint):
        base = Path(folder).relative_to(checkpoint)
        names += [(base / f).as_posix() for f in files]
        names += [(base / d).as_posix() for d in dirs if (Path(folder) / d).is_symlink()]
    return names


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
            _write_json(tmp / TRAINER_STATE_NAME, dataclasses.asdict(state))
            write_record(tmp, state.step, accelerator.num_processes)
            # A folder of the same step is a leftover: incomplete, or from the timeline
            # after the step an explicit --resume went back to. Its marker goes first.
            (final / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)

    def publish() -> None:
        if main:
            publish_export(final, Path(run_dir) / "model")
            prune(run_dir, keep_last)

    collectively(accelerator, start, what, discard)
    collectively(accelerator, lambda: write_state(accelerator, tmp / STATE_SUBDIR, parts),
                 what, discard)
    collectively(accelerator, finish, what, discard)
    collectively(accelerator, publish, f"publishing checkpoint {final}")  # it is complete
    return final


def write_state(accelerator, folder: Path, parts: dict[str, Part]) -> None:
    """This rank's share of `state/`: its RNG; the main process also every part of the
    table and the accelerator state."""
    if accelerator.is_main_process:
        for name, part in parts.items():
            write_part(folder, name, part)
        scaler = accelerator.scaler
        _write_json(folder / ACCELERATOR_STATE_NAME,
                    {"step": accelerator.step,
                     "scaler": scaler.state_dict() if scaler is not None else None})
    write_rng(folder, accelerator.process_index)


def write_part(folder: Path, name: str, part: Part) -> None:
    if not _PART_NAME.match(name) or name == "accelerator":
        raise ValueError(f"checkpoint part name {name!r}: lowercase letters, digits and _")
    if isinstance(part, torch.optim.Optimizer):
        tensors, layout = optimizer_state(part)
        _write_tensors(folder / f"{name}.safetensors", tensors)
        _write_json(folder / f"{name}.json", layout)
    elif isinstance(part, nn.Module):
        _write_tensors(folder / f"{name}.safetensors", part.state_dict())
    else:
        raise TypeError(f"checkpoint part {name!r} is a {type(part).__name__}, neither a "
                        f"module nor an optimizer")


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # A fresh contiguous CPU copy of each: safetensors refuses tensors that share memory.
    atomic_write_bytes(path, save({k: v.detach().to("cpu", memory_format=torch.contiguous_format,
                                                    copy=True) for k, v in tensors.items()}))


def _write_json(path: Path, obj: Any) -> None:
    # Exact, not strict: state must come back bit for bit, so a non-finite float stays
    # what it is (Python's json reads its NaN/Infinity back) instead of becoming null.
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def write_record(folder: Path, step: int, world_size: int) -> None:
    """COMPLETE, last: the size and sha256 of every file written before it."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in sorted(_files_under(folder)) if name != COMPLETE_MARKER}
    _write_json(folder / COMPLETE_MARKER, {"format": CHECKPOINT_FORMAT, "step": step,
                                           "world_size": world_size, "files": files})


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state_dict as (tensors, JSON layout): per-parameter tensors go to
    safetensors, everything else (param_groups, scalar state values) to JSON."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {"param_groups": _json_only(state_dict["param_groups"],
                                                         "param_groups"),
                              "tensors": {}, "values": {}}
    for param_id, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensor_name = f"{param_id}.{len(tensors)}"
                tensors[tensor_name] = value
                layout["tensors"].setdefault(str(param_id), {})[key] = tensor_name
            else:
                layout["values"].setdefault(str(param_id), {})[key] = _json_only(value, key)
    return tensors, layout


def _json_only(value: Any, where: str) -> Any:
    """`value` if JSON holds it exactly (tuples become lists); else a clear error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_only(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_only(v, where) for k, v in value.items()}
    raise TypeError(f"optimizer state {where!r} holds a {type(value).__name__}: only tensors "
                    f"and JSON values are saved (without pickle)")


def write_rng(folder: Path, rank: int) -> None:
    """This rank's generators: torch CPU and CUDA as uint8 tensors, numpy and `random` as
    JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    _write_tensors(folder / f"rng-{rank}.safetensors", tensors)
    _write_json(folder / f"rng-{rank}.json", {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}})


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


# ---------------------------------------------------------------- reading

def load_checkpoint(accelerator, checkpoint: Path, parts: dict[str, Part]) -> None:
    """Restore every part of the table, the accelerator state and this rank's RNG from a
    checkpoint `verify_checkpoint` accepted. Raises CheckpointError naming the file that
    does not fit (wrong keys or shapes, a part this run has and the checkpoint lacks)."""
    checkpoint = Path(checkpoint)
    for name, part in parts.items():
        if isinstance(part, torch.optim.Optimizer):
            load_optimizer(checkpoint, name, part)
        else:
            load_module(checkpoint, name, part)
    load_accelerator_state(checkpoint, accelerator)
    load_rng(checkpoint, accelerator.process_index)


def _load_tensors(checkpoint: Path, name: str, what: str) -> dict[str, Tensor]:
    path = checkpoint / STATE_SUBDIR / name
    if not path.is_file():
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name} is missing: this run has "
                                          f"{what} but the checkpoint does not (resume with the "
                                          f"options it was trained with, e.g. --ema)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name} is not a safetensors file "
                                          f"({e})") from None


def load_module(checkpoint: Path, name: str, module: nn.Module) -> None:
    tensors = _load_tensors(checkpoint, f"{name}.safetensors", f"a {name!r} module")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        first = str(e).strip().splitlines()[:2]
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name}.safetensors does not fit this "
                                          f"run's {name}: {' '.join(first)}") from None


def load_optimizer(checkpoint: Path, name: str, optimizer: torch.optim.Optimizer) -> None:
    tensors = _load_tensors(checkpoint, f"{name}.safetensors", f"an optimizer {name!r}")
    layout = _read_json(checkpoint, f"{STATE_SUBDIR}/{name}.json")
    try:
        state_dict = optimizer_state_dict(layout, tensors, optimizer)
        optimizer.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{name}.json / .safetensors do not "
                                          f"fit this run's optimizer: {e!r}") from None


def optimizer_state_dict(layout: dict, tensors: dict[str, Tensor],
                         optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of `optimizer_state`: a state_dict for `optimizer.load_state_dict`.
    Lists in param_groups become tuples where the live optimizer holds tuples (betas)."""
    state: dict[int, dict[str, Any]] = {}
    for param_id, names in layout["tensors"].items():
        state.setdefault(int(param_id), {}).update(
            {key: tensors[tensor_name] for key, tensor_name in names.items()})
    for param_id, values in layout["values"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = layout["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{len(optimizer.param_groups)} parameter groups expected")
    restored = []
    for saved, live in zip(groups, optimizer.param_groups):
        restored.append({key: tuple(value) if isinstance(live.get(key), tuple)
                         and isinstance(value, list) else value
                         for key, value in dict(saved).items()})
    return {"state": state, "param_groups": restored}


def load_accelerator_state(checkpoint: Path, accelerator) -> None:
    data = _read_json(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}")
    step, scaler_state = data.get("step"), data.get("scaler")
    if not _is_count(step):
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}: step must "
                                          f"be an integer >= 0, got {step!r}")
    accelerator.step = step  # the micro-step counter that decides when gradients sync
    scaler = accelerator.scaler
    if scaler is None or scaler_state is None:
        if scaler is not None:
            note_on_main(f"{checkpoint} has no fp16 loss-scaler state (it was not trained "
                         f"with fp16): the scaler starts afresh")
        return
    expected = set(scaler.state_dict())
    if (not isinstance(scaler_state, dict) or set(scaler_state) != expected
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in scaler_state.values())):
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}: the scaler "
                                          f"state needs numbers for {', '.join(sorted(expected))}")
    scaler.load_state_dict(scaler_state)


def load_rng(checkpoint: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has none for this rank
    (it was written by fewer processes: the caller says resume is then not exact)."""
    if not (checkpoint / STATE_SUBDIR / f"rng-{rank}.json").is_file():
        return False
    tensors = _load_tensors(checkpoint, f"rng-{rank}.safetensors", "a random state")
    data = _read_json(checkpoint, f"{STATE_SUBDIR}/rng-{rank}.json")
    try:
        python, numpy_state = data["python"], data["numpy"]
        torch.set_rng_state(tensors["torch"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda.{i}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"cuda.{i}"], i)
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], np.uint32),
                             numpy_state["pos"], numpy_state["has_gauss"],
                             numpy_state["cached_gaussian"]))
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(checkpoint, f"{STATE_SUBDIR}/rng-{rank}.json / .safetensors: not a "
                                          f"random state ({e!r})") from None
    return True
