"""COMPLETE, the record written last into a checkpoint, and verification against it.

COMPLETE holds {"format", "step", "world_size", "files": {name: {"size", "sha256"}}} of
every other file. `verify_checkpoint` checks a checkpoint against it (names, sizes,
sha256, file formats, no file it does not list) before resume trusts anything in it.
Checkpoints of the previous format (Accelerate's pickles, COMPLETE without hashes) are
refused: they cannot be read without unpickling.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..layout import COMPLETE_MARKER, EXPORT_FILES, STATE_SUBDIR, TRAINER_STATE_NAME
from ..utils import sha256_file
from .state import (ACCELERATOR_STATE_NAME, CheckpointError, TrainerState, is_count,
                    read_json_object, write_exact_json)

CHECKPOINT_FORMAT = 2
STEP_DIR = re.compile(r"^step-(\d+)$")  # the inverse of layout.step_dir_name
# Every file name a checkpoint of this format may hold (COMPLETE's names are data).
_CHECKPOINT_FILE = re.compile(
    "^(" + "|".join(re.escape(name) for name in (TRAINER_STATE_NAME, *EXPORT_FILES))
    + rf"|{re.escape(STATE_SUBDIR)}/[a-z][a-z0-9_-]*\.(safetensors|json))$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REQUIRED_FILES = (TRAINER_STATE_NAME, *EXPORT_FILES, f"{STATE_SUBDIR}/{ACCELERATOR_STATE_NAME}")


def write_record(folder: Path, step: int, world_size: int) -> None:
    """COMPLETE, last: the size and sha256 of every file written before it."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in sorted(files_under(folder)) if name != COMPLETE_MARKER}
    write_exact_json(folder / COMPLETE_MARKER, {"format": CHECKPOINT_FORMAT, "step": step,
                                                "world_size": world_size, "files": files})


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
    if not (isinstance(files, dict) and is_count(step) and is_count(world) and world >= 1):
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} lacks its step, world_size or "
                                          f"file list")
    match = STEP_DIR.match(checkpoint.name)
    if match and int(match.group(1)) != step:
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} records step {step}, but the "
                                          f"folder is {checkpoint.name}")
    for name, entry in files.items():
        _check_entry(checkpoint, name, entry)
    rng = [f"{STATE_SUBDIR}/rng-{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")]
    missing = [name for name in (*REQUIRED_FILES, *rng) if name not in files]
    if missing:
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} does not list {', '.join(missing)}")
    return record


def _check_entry(checkpoint: Path, name: str, entry: Any) -> None:
    if not _CHECKPOINT_FILE.match(name):
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER} lists {name!r}, which is not "
                                          f"a file this trainer writes")
    if not (isinstance(entry, dict) and is_count(entry.get("size"))
            and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])):
        raise CheckpointError(checkpoint, f"{COMPLETE_MARKER}: no valid size and sha256 "
                                          f"for {name}")


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
    unlisted = sorted(set(files_under(checkpoint)) - set(listed) - {COMPLETE_MARKER})
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
        read_json_object(checkpoint, name)


def files_under(checkpoint: Path) -> list[str]:
    """Relative names of everything but directories below `checkpoint` (links included,
    never followed)."""
    names = []
    for folder, dirs, files in os.walk(checkpoint):
        base = Path(folder).relative_to(checkpoint)
        names += [(base / f).as_posix() for f in files]
        names += [(base / d).as_posix() for d in dirs if (Path(folder) / d).is_symlink()]
    return names


def trusted_state(checkpoint: Path) -> TrainerState:
    """The trainer state of a checkpoint that verifies, and whose trainer.json agrees with
    COMPLETE on the step; CheckpointError otherwise."""
    record = verify_checkpoint(checkpoint)
    state = TrainerState.read(checkpoint)
    if state.step != record["step"]:
        raise CheckpointError(checkpoint, f"{TRAINER_STATE_NAME} is at step {state.step}, "
                                          f"{COMPLETE_MARKER} at step {record['step']}")
    return state
