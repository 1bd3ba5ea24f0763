"""Small shared helpers: atomic writes, strict JSON, CPU count, provenance.

Every stage writes shards, manifests, checkpoints and metrics through these so that a
crash at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator


class PipelineError(Exception):
    """A user-facing error: the message says what is wrong and what to do.

    The CLI prints it without a traceback and exits with status 2.
    """


# A write that fails for one of these reasons is the user's to fix (space, quota,
# permissions, a read-only mount), not a bug: the CLI reports it in one line, exit 2.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def output_error_message(error: OSError) -> str | None:
    """One line for a file that could not be written (or read) for a reason the user
    fixes, or None if `error` is something else (a bug: let it show its traceback)."""
    if error.errno not in OUTPUT_ERRNOS:
        return None
    where = f"{error.filename}: " if error.filename else ""
    hint = ("free space on that file system" if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose a writable directory" if error.errno == errno.EROFS
            else "check the permissions of that path")
    return (f"{where}{error.strerror or error}; {hint}, then re-run: finished outputs are "
            f"kept and no partial file is left")


def run_stage(main_fn, argv: list[str]) -> int:
    """Run a stage's `main(argv)`: a user error prints one clear line (exit 2) instead of a
    traceback; Ctrl-C exits 130. Every stage's `__main__` and the `pipeline` CLI use it."""
    try:
        return int(main_fn(argv) or 0)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        message = output_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def read_json(path: str | os.PathLike, what: str = "file", fix: str = "") -> Any:
    """Parse a JSON file, or raise PipelineError naming it, what it is and what to do.

    `what` ("shard manifest", "checkpoint config"...) and `fix` ("re-run `pipeline
    prepare`") go into the message; strict: NaN/Infinity are refused like other bad JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8, NaN/Infinity
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PipelineError(f"cannot read {what} {path}: {reason}"
                            + (f"; {fix}" if fix else "")) from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ---------------------------------------------------------------- atomic writes

def _tmp_name(path: Path) -> Path:
    # Same directory as the target so that os.replace is a rename, not a copy.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt leaves the old file, no temporary
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_strict_json(obj: Any) -> Any:
    """Replace NaN/inf floats by None (recursively) so json.dumps(allow_nan=False) works."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return to_strict_json(obj.item())  # numpy / torch scalars
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_strict_json(obj), indent=indent, allow_nan=False, sort_keys=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj) + "\n")


def record_once(path: str | os.PathLike, record: dict[str, Any], what: str,
                fix: str) -> dict[str, Any] | None:
    """A job's identity: written at `path` on first use (returns None), else the record
    already there, a JSON object (a PipelineError naming `what`, the file and `fix`
    otherwise), for the caller to compare with `record`."""
    path = Path(path)
    if not path.is_file():
        atomic_write_json(path, record)
        return None
    old = read_json(path, what, fix)
    if not isinstance(old, dict):
        raise PipelineError(f"{what} {path} is not a JSON object; {fix}")
    return old


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` by rename.

    On error the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp makes the directory private (0700); give it the mode a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if final.exists():
            # Move the old one aside first: rename onto a non-empty directory fails.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous result back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- environment

def available_cpus() -> int:
    """Cores this process may use: SLURM's allocation, else CPU affinity, else os.cpu_count().

    On a shared cluster node os.cpu_count() reports the whole machine, which would
    oversubscribe the cores SLURM actually gave this job.
    """
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the source tree this package runs from, or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    names = ["ae-pipeline", "torch", "torchvision", "accelerate", "webdataset", "wandb",
             "einops", "torchmetrics", "numpy", "pillow", "safetensors"]
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict[str, Any]:
    """What produced an artifact: git commit and package versions."""
    return {"git_commit": git_commit(), "versions": package_versions()}
