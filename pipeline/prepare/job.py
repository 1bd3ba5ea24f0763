"""One job per output, and only prepare's files in it.

- The files of `OUT/<split>/` that belong to a part K/N (`part_file_names`): its shards,
  `manifest[.part-K-of-N].json`, `failures[.part-K-of-N].jsonl`; and in `.progress/`:
  one record per finished shard, `job.json` (the job's identity), `prepare[.part-K-of-N]
  .yaml` (the resolved config of the last run of that part), `lock` and the part locks.
- Locks: a part's lock `OUT/<split>/.progress/lock.part-K-of-N` (a whole job is 0/1) is
  taken before any write, refusing, with the holder's PID, host and command, while
  another job holds the same part or one of another N (their shards overlap); `--merge`
  is refused while any part runs. Only then are this part's stale temporary files removed.
- The job record: the shard `Options`, a fingerprint of the listed inputs and of the class
  map. It is written on first use, and a re-run with anything different is refused,
  naming what differs: shards of different runs are never mixed.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from ..inputs import ClassMap, Item, input_fingerprint
from ..locking import Lock, OutputLocked, acquire, describe_holder, holder_of, mutex
from ..shards import FAILURES_NAME, MANIFEST_NAME, shard_name
from ..utils import PipelineError, record_once
from .options import OPTION_FLAGS, Options, job_options

JOB_RECORD = "job.json"
PROGRESS_DIR = ".progress"
CONFIG_NAME = "prepare.yaml"
MUTEX_NAME = "lock"  # .progress/lock: held for a moment to check other jobs' part locks
PART_LOCK = re.compile(r"lock\.part-(\d+)-of-(\d+)$")  # held by a running job of part K/N


# ---------------------------------------------------------------- file names

def part_suffix(part: tuple[int, int]) -> str:
    return f"part-{part[0]}-of-{part[1]}"


def manifest_name(part: tuple[int, int]) -> str:
    return MANIFEST_NAME if part[1] == 1 else f"manifest.{part_suffix(part)}.json"


def failures_name(part: tuple[int, int]) -> str:
    return FAILURES_NAME if part[1] == 1 else f"failures.{part_suffix(part)}.jsonl"


def config_name(part: tuple[int, int]) -> str:
    """`.progress/prepare.yaml` of a whole job, `prepare.part-K-of-N.yaml` of a part: each
    part's own, since parts differ in --part (and may in --workers, paths...)."""
    return CONFIG_NAME if part[1] == 1 else f"prepare.{part_suffix(part)}.yaml"


def record_path(split_dir: Path, name: str) -> Path:
    return split_dir / PROGRESS_DIR / f"{name}.json"


def describe_part(part: tuple[int, int]) -> str:
    return "the whole job" if part[1] == 1 else f"part {part[0]}/{part[1]}"


# ---------------------------------------------------------------- locks

def part_lock_path(split_dir: Path, part: tuple[int, int]) -> Path:
    return split_dir / PROGRESS_DIR / f"lock.{part_suffix(part)}"


def split_mutex(split_dir: Path) -> Any:
    """Held for a moment while a job checks other jobs' part locks or writes `job.json`."""
    return mutex(split_dir / PROGRESS_DIR / MUTEX_NAME)


def held_part_locks(split_dir: Path) -> list[tuple[tuple[int, int], dict[str, Any]]]:
    """(part, holder record) of every part lock of the split that a running job holds."""
    held = []
    for path in sorted((split_dir / PROGRESS_DIR).glob("lock.part-*")):
        m = PART_LOCK.match(path.name)
        if m and (holder := holder_of(path)) is not None:
            held.append(((int(m[1]), int(m[2])), holder))
    return held


def lock_part(split_dir: Path, part: tuple[int, int]) -> Lock:
    """Take part K/N's lock of OUT/<split>, or raise OutputLocked naming the job that
    holds an overlapping one: the same K/N, or any other N (0/2 and 1/3 share shard 4;
    the whole job, 0/1, overlaps every part). Checked and taken inside the split's
    mutex, so two jobs starting together cannot both pass."""
    with split_mutex(split_dir):
        for other, holder in held_part_locks(split_dir):
            if other[1] != part[1] or other == part:
                overlap = ("" if other == part else
                           f", and its shards overlap those of {describe_part(part)}")
                raise OutputLocked(
                    f"--output {split_dir}: {describe_part(other)} is already being prepared "
                    f"by {describe_holder(holder)}{overlap}; wait for it to finish (then "
                    "re-run this command), or choose another --output", holder)
        return acquire(part_lock_path(split_dir, part), f"--output {split_dir} "
                                                         f"({describe_part(part)})")


def refuse_running_parts(split_dir: Path) -> None:
    held = held_part_locks(split_dir)
    if held:
        part, holder = held[0]
        raise OutputLocked(f"--merge {split_dir}: {describe_part(part)} is still being "
                           f"prepared by {describe_holder(holder)}; merge once every part "
                           "has finished", holder)


# ---------------------------------------------------------------- the output directory

def check_local_output(output: Path) -> None:
    if "://" in str(output) or str(output).startswith(("s3:/", "gs:/")):
        raise PipelineError(
            f"--output {output}: shards are written to a local (or mounted) directory so "
            "every write can be an atomic rename; prepare locally, then copy with "
            "`aws s3 sync` / `gsutil -m rsync -r` (see shards/README.md)")


def refuse_foreign_directory(split_dir: Path) -> None:
    """Before anything is written into it: OUT/<split> is empty, absent, or prepare's."""
    if split_dir.exists() and not split_dir.is_dir():
        raise PipelineError(f"--output: {split_dir} is a file, not a directory; choose a "
                            "new --output")
    if not (split_dir / PROGRESS_DIR / JOB_RECORD).is_file():
        refuse_unknown_contents(split_dir)


def refuse_unknown_contents(split_dir: Path) -> None:
    # The progress directory alone may be another part's, starting at the same time.
    if split_dir.is_dir() and any(p.name != PROGRESS_DIR for p in split_dir.iterdir()):
        raise PipelineError(
            f"{split_dir} is not empty and holds no {PROGRESS_DIR}/{JOB_RECORD}: it was not "
            "written by `pipeline prepare`; choose a new --output")


def part_file_names(split: str, shards: list[int], part: tuple[int, int]) -> list[str]:
    """The files only this part writes: its shards, its manifest, its failures list and
    its saved config."""
    return ([shard_name(split, i) for i in shards]
            + [manifest_name(part), failures_name(part), config_name(part)])


def remove_stale_temp_files(split_dir: Path, names: list[str]) -> None:
    """Temp files (`.<name>.tmp-<pid>`) of the files `names` of this part only: another
    part may be writing its own next to them on a shared file system. Called with this
    part's lock held (no other job writes these names), at the start and on the way
    out of an interrupted or failed run. Shard records are `<shard>.json` in the
    progress directory."""
    mine = set(names) | {f"{name}.json" for name in names}
    for directory in (split_dir, split_dir / PROGRESS_DIR):
        if not directory.is_dir():
            continue
        for path in directory.glob(".*.tmp-*"):
            if path.name[1:].split(".tmp-")[0] in mine:
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------- job record (refuse mixing)

def job_record(options: Options, items: list[Item], classes: ClassMap) -> dict[str, Any]:
    """The job's identity, as `job.json` and the manifest's `job` hold it."""
    return {"options": job_options(options), "input": input_fingerprint(items),
            "classes_sha256": hashlib.sha256("\n".join(classes.wnids).encode(
                "utf-8", "surrogateescape")).hexdigest()}


def check_job_record(split_dir: Path, job: dict[str, Any]) -> None:
    """Write the job's identity on first use; refuse a re-run with different options."""
    path = split_dir / PROGRESS_DIR / JOB_RECORD
    if not path.is_file():
        refuse_unknown_contents(split_dir)
    old = record_once(path, job, "job record", f"delete {split_dir} to start over")
    if old is not None and not all(isinstance(old.get(k), dict) for k in ("options", "input")):
        raise PipelineError(f"job record {path} has no 'options' and 'input' objects: it was "
                            f"not written by `pipeline prepare`; delete {split_dir} to start "
                            f"over")
    differences = describe_differences(old, job) if old is not None else []
    if differences:
        raise PipelineError(
            f"{split_dir} holds shards made with different options ({'; '.join(differences)}); "
            "shards of different runs are never mixed: use a new --output, or delete "
            f"{split_dir} to start over")


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old_options, old_input = old.get("options", {}), old.get("input", {})
    found = [f"{OPTION_FLAGS.get(k, k)} {old_options.get(k)!r} there, {v!r} now"
             for k, v in new["options"].items() if old_options.get(k) != v]
    if old_input != new["input"]:
        was, now = old_input.get("num_files"), new["input"]["num_files"]
        found.append(f"input: {was} files there, {now} now" if was != now
                     else "input: different files or labels")
    if old.get("classes_sha256") != new["classes_sha256"]:
        found.append("class map differs")
    return found
