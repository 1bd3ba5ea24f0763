"""`pipeline prepare` as a job among others: one job per output (part locks), SIGTERM and
SIGKILL of the job (workers, temporaries, exit 75, resume), full or read-only disks, and
option ranges."""
from __future__ import annotations

import errno
import io
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import locking, prepare as prep, shards
from pipeline.cli import run_stage
from pipeline.utils import PipelineError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["n00000001", "n00000002"]


def tiny_tree(root: Path, n: int = 6) -> Path:
    for i in range(n):
        path = root / "train" / CLASSES[i % 2] / f"im{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (40 * i % 256, 90, 20)).save(path, "JPEG")
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(root), "--output", str(out), "--workers", "1", "--shard-size", "2",
            "--no-progress", *extra]


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def shard_bytes(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.glob("*.tar"))}


# ---------------------------------------------------------------- one job per output

def hold(out: Path, part: tuple[int, int]) -> locking.Lock:
    """Hold part K/N's lock of OUT/train as a running job would (another open file
    description: flock sees it as another holder, also within this process)."""
    return locking.acquire(out / "train" / ".progress" / f"lock.part-{part[0]}-of-{part[1]}",
                           "test")


@pytest.mark.parametrize("held, attempted, allowed", [
    ((0, 1), (0, 1), False), ((0, 1), (1, 2), False),
    ((0, 2), (1, 2), True), ((0, 2), (0, 2), False), ((0, 2), (0, 1), False),
    ((0, 2), (2, 3), False)])
def test_a_job_is_refused_while_another_holds_overlapping_shards(tmp_path, held, attempted,
                                                                 allowed):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    assert prep.main(args(root, out)) == 0
    for shard in (out / "train").glob("*.tar"):  # ... redone by the job that holds the lock
        shard.unlink()
    running = out / "train" / ".train-000000.tar.tmp-424242"  # the running job's shard
    with hold(out, held):
        running.write_bytes(b"being written")
        argv = args(root, out, "--part", f"{attempted[0]}/{attempted[1]}")
        if allowed:
            assert prep.main(argv) == 0
        else:
            with pytest.raises(locking.OutputLocked) as info:
                prep.main(argv)
            message = str(info.value)
            assert f"pid {os.getpid()}" in message and "wait for it to finish" in message
            assert info.value.holder["pid"] == os.getpid()
            assert not list((out / "train").glob("*.tar"))  # nothing redone meanwhile
        assert running.read_bytes() == b"being written"  # never another job's to delete


def test_merge_is_refused_while_a_part_runs(tmp_path):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    for k in range(2):
        assert prep.main(args(root, out, "--part", f"{k}/2")) == 0
    with hold(out, (1, 2)):
        with pytest.raises(locking.OutputLocked, match="part 1/2 is still being prepared"):
            prep.main(["--merge", str(out)])
        assert not (out / "train" / "manifest.json").exists()
    assert prep.main(["--merge", str(out)]) == 0


# ---------------------------------------------------------------- signals

def slow_tree(root: Path, n: int) -> Path:
    """Large PNGs (no DCT shortcut, ~10 ms each), all links to one file."""
    y, x = np.mgrid[0:800, 0:1000]
    pixels = np.stack([x * 255 // 1000, y * 255 // 800, (x + y) % 256], -1).astype(np.uint8)
    source = root / "source.png"
    source.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(source, "PNG")
    for i in range(n):
        link = root / "train" / CLASSES[i % 2] / f"img_{i:03d}.JPEG"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return root


@pytest.fixture(scope="module")
def slow_job(tmp_path_factory):
    """A tree that takes a 2-worker job ~1 s, and its uninterrupted output."""
    base = tmp_path_factory.mktemp("slow")
    root = slow_tree(base / "in", 200)
    job = ["--input", str(root), "--shard-size", "5", "--no-progress"]
    reference = base / "reference"
    assert prep.main([*job, "--output", str(reference), "--workers", "1"]) == 0
    return job, shard_bytes(reference / "train")


def start_job(job: list[str], out: Path, **popen) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", *job, "--workers", "2",
                             "--output", str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)
    deadline = time.monotonic() + 60
    while not list((out / "train" / ".progress").glob("train-*.json")):  # mid-run
        assert proc.poll() is None, "the job ended before its first shard"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return proc


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def alive(pids: list[int]) -> list[int]:
    """The processes of `pids` still running (zombies, never reaped here, are ended)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            running.append(pid)
    return running


def wait_until_ended(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def test_sigterm_stops_cleanly_with_exit_75_and_a_rerun_completes(slow_job, tmp_path, capsys):
    job, reference = slow_job
    out = tmp_path / "out"
    proc = start_job(job, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # A second job on the same output meanwhile is refused, naming the first.
    assert run_stage(prep.main, [*job, "--output", str(out), "--workers", "1"]) == 2
    refusal = capsys.readouterr().err
    assert f"pid {proc.pid} on host" in refusal and "--workers 2" in refusal, refusal
    assert refusal.count("\n") == 1

    workers = descendants(proc.pid)
    assert workers  # the forkserver and its workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == prep.EXIT_INTERRUPTED == 75
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "re-run the same command" in lines[0]
    assert not wait_until_ended(workers, 10)
    assert not temporaries(out)
    assert not (out / "train" / "manifest.json").exists()  # it really stopped mid-run

    assert prep.main([*job, "--output", str(out), "--workers", "1"]) == 0
    assert shard_bytes(out / "train") == reference


def test_sigkill_of_the_job_ends_its_workers_and_releases_the_callers_stdout(slow_job,
                                                                            tmp_path):
    job, reference = slow_job
    out = tmp_path / "out"
    proc = start_job(job, out, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    workers = descendants(proc.pid)
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A caller reading the job's stdout (a pipeline) sees EOF once no process holds it.
    deadline = time.monotonic() + 10
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the job's stdout is still held open 10 s after SIGKILL"
        if not os.read(proc.stdout.fileno(), 1 << 16):
            break
    proc.stdout.close()
    assert not wait_until_ended(workers, 10)
    assert prep.main([*job, "--output", str(out), "--workers", "1"]) == 0
    assert shard_bytes(out / "train") == reference
    assert not temporaries(out)


def test_sigint_in_a_one_worker_job_exits_75_and_is_no_failed_input(tmp_path, capsys,
                                                                    monkeypatch):
    # One worker decodes in this process: the stop must not be caught as a decoder error.
    root, out = tiny_tree(tmp_path / "in", 40), tmp_path / "out"
    real, calls = prep.process_chunk, itertools.count()

    def interrupted(task):
        if next(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after three chunks
        return real(task)

    monkeypatch.setattr(prep.pool, "process_chunk", interrupted)
    try:
        code = prep.main(args(root, out, "--shard-size", "4"))
    except KeyboardInterrupt:
        pytest.fail("SIGINT escaped as a KeyboardInterrupt: no exit 75, no resume message")
    assert code == 75
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped by SIGINT" in err
    assert not temporaries(out) and not (out / "train" / "manifest.json").exists()
    assert len(list((out / "train").glob("*.tar"))) == 3
    assert prep.main(args(root, out, "--shard-size", "4")) == 0  # the re-run resumes
    assert prep.main(args(root, tmp_path / "whole", "--shard-size", "4")) == 0
    assert shard_bytes(out / "train") == shard_bytes(tmp_path / "whole" / "train")
    assert json.loads((out / "train" / "manifest.json").read_text())["num_failures"] == 0


WORKER_LAUNCHER = """
import multiprocessing, os, signal, sys, time


def worker():
    from pipeline import prepare as prep
    prep.worker_init()
    os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler or Ctrl-C sends the group
    os.kill(os.getpid(), signal.SIGINT)
    print("survived", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=worker)
    child.start()
    print(child.pid, flush=True)
    time.sleep(float(sys.argv[1]))
    os._exit(0)  # the parent is gone without a word to its worker
"""


def test_workers_ignore_stop_signals_and_exit_when_their_parent_is_gone(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(WORKER_LAUNCHER)
    proc = subprocess.run([sys.executable, str(launcher), "2"], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    lines = proc.stdout.decode().split()
    assert lines[1:] == ["survived"], proc.stderr.decode()
    assert not wait_until_ended([int(lines[0])], 10)


# ---------------------------------------------------------------- full and read-only disks

class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: writes then fail with ENOSPC,
    and so does the flush of what is still buffered when the file is closed."""

    def __init__(self, path, room: int):
        self.file, self.room, self.path = open(path, "wb", buffering=0), room, str(path)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        self.room -= len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def test_a_full_disk_mid_shard_ends_in_one_line_and_leaves_nothing_partial(tmp_path, capsys,
                                                                         monkeypatch):
    root, out = tiny_tree(tmp_path / "in", 40), tmp_path / "out"
    real_open = open

    def filling_open(path, mode="r", *a, **kw):
        if "train-000002.tar" in str(path):
            # Buffered, as a real file is: the close after the failure fails too.
            return io.BufferedWriter(FullDisk(path, room=0), buffer_size=1 << 16)
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(shards, "open", filling_open, raising=False)
    assert run_stage(prep.main, args(root, out, "--shard-size", "4")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "No space left" in err
    split = out / "train"
    assert not temporaries(out)
    assert not (split / "manifest.json").exists() and not (split / "failures.jsonl").exists()
    assert not (split / "train-000002.tar").exists()

    monkeypatch.undo()  # space freed: the re-run completes
    assert run_stage(prep.main, args(root, out, "--shard-size", "4")) == 0
    assert json.loads((split / "manifest.json").read_text())["num_samples"] == 40


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_manifest_that_cannot_be_written_leaves_no_failures_list_behind(tmp_path, capsys,
                                                                         monkeypatch, code):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"

    def refuse(split_dir, manifest):
        raise OSError(code, os.strerror(code), str(split_dir / "manifest.json"))

    monkeypatch.setattr(prep.manifest, "write_manifest", refuse)
    assert run_stage(prep.main, args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.strerror(code) in err and "manifest.json" in err
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        ".progress", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not temporaries(out)


def test_a_read_only_output_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom chmod does not make a directory read-only.
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):
        if str(self).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert run_stage(prep.main, args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Read-only file system" in err
    assert "choose a writable directory" in err
    assert not out.exists()


# ---------------------------------------------------------------- option ranges

@pytest.mark.parametrize("extra, message", [
    (["--max-failures", "-1"], "--max-failures must be at least 0"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--workers", "-3"], "--workers must be at least 1"),
    (["--shard-size", "0"], "--shard-size must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--image-size", "100000"], "--image-size must be at most 4096"),
    (["--image-format", "jpg", "--quality", "0"], "--quality must be 1-100"),
    (["--image-format", "webp", "--quality", "101"], "--quality must be 1-100"),
    (["--max-pixels", "0"], "--max-pixels must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--decode-oversampling", "0"], "--decode-oversampling must be at least 1"),
    (["--part", "2/2"], "out of range"),
    (["--part", "0/0"], "out of range"),
    (["--splits", "../elsewhere"], "not a split name"),
    (["--splits", "train,a/b"], "not a split name"),
])
def test_out_of_range_options_are_refused_before_anything_is_written(tmp_path, capsys, extra,
                                                                     message):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    assert run_stage(prep.main, args(root, out) + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_slurm_array_variables_that_are_not_integers_are_refused():
    env = {"SLURM_ARRAY_TASK_ID": "3x", "SLURM_ARRAY_TASK_COUNT": "4"}
    with pytest.raises(PipelineError, match="SLURM_ARRAY_TASK_ID/COUNT: expected integers"):
        prep.parse_part(None, env)


def test_merge_refuses_a_part_manifest_naming_a_file_outside_the_split(tmp_path):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    for k in range(2):
        assert prep.main(args(root, out, "--part", f"{k}/2")) == 0
    part_path = out / "train" / "manifest.part-1-of-2.json"
    part = json.loads(part_path.read_text())
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"x" * part["shards"][0]["bytes"])
    part["shards"][0]["name"] = "../../outside.tar"
    part_path.write_text(json.dumps(part))
    with pytest.raises(PipelineError, match="not a shard of this split"):
        prep.main(["--merge", str(out)])
    assert not (out / "train" / "manifest.json").exists()


def test_help_documents_the_exit_status_of_an_interrupted_job(capsys):
    with pytest.raises(SystemExit):
        prep.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "75 stopped by SIGTERM or SIGINT" in text and "re-run the same command" in text
