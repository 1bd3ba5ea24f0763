"""The directory rules of generated data (the sample tree, the benchmark JPEGs).

A generated directory ends with `sample.json`, written last: the options it was made with
and its counts. A re-run with the same options finds it complete and writes nothing; a
directory that is not a complete output with these options is replaced only when empty,
or with `overwrite` (`--force`), and always as a whole (`atomic_dir`): never half-written.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

from ..utils import PipelineError, atomic_dir, atomic_write_json, provenance

# Bump when the drawing code changes: a tree recorded with another version is not
# "already complete" for the same options, because its images differ.
GENERATOR_VERSION = 1
RECORD_NAME = "sample.json"
RECORD_FORMAT = "ae-pipeline-sample/1"


def check_seed(seed: int) -> None:
    if seed < 0:  # numpy's seed sequences take non-negative integers only
        raise PipelineError(f"--seed must be 0 or more, got {seed}")


def write_record(root: Path, mode: str, options: dict[str, Any], counts: dict[str, Any]) -> None:
    atomic_write_json(root / RECORD_NAME, {"format": RECORD_FORMAT, "mode": mode,
                                           "options": options, "counts": counts,
                                           "provenance": provenance()})


def complete_record(root: str | Path, mode: str, options: dict[str, Any],
                    files_present: Callable[[Path, dict[str, Any]], bool]
                    ) -> dict[str, Any] | None:
    """The record of `root` if it is a complete output of `mode` made with `options`.

    The record is written last, so its presence means the writer finished;
    `files_present(root, counts)` (counting the files, say) also catches files deleted
    since.
    """
    root = Path(root)
    try:
        record = json.loads((root / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or record.get("mode") != mode or record.get("options") != options):
        return None
    counts = record.get("counts", {})
    return record if files_present(root, counts if isinstance(counts, dict) else {}) else None


def replacing_dir(root: str | Path, overwrite: bool) -> contextlib.AbstractContextManager[Path]:
    """`atomic_dir(root)` after checking that replacing `root` loses nothing of the user's."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise PipelineError(f"{root} exists and is not a directory; choose another --output")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise PipelineError(
            f"{root} is not empty and is not a complete sample made with these options; "
            "choose an empty or new directory, or pass --force (overwrite=True) to replace "
            "its contents")
    return atomic_dir(root)


def write_new_file(path: Path, data: bytes) -> None:
    # A plain write is enough: the file lives in a temporary tree that is renamed into
    # place only once complete (fsyncing hundreds of small files would dominate the time).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
