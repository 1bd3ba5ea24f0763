"""`pipeline prepare` on hostile input trees: names that are not UTF-8, link loops, FIFOs
and other entries that are not regular files, unreadable directories."""
from __future__ import annotations

import json
import os
import signal
import socket
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline import inputs, prepare as prep
from pipeline.cli import run_stage

CLASS = "n00000001"


class Expired(BaseException):
    """Raised by the deadline fixture; a BaseException so that nothing records it as a
    failed input and carries on."""


@pytest.fixture
def deadline():
    """Fail instead of hanging: a listing that never ends, or a read of a FIFO, used to
    block the job forever."""
    def expire(signum, frame):
        raise Expired("the job did not end within 30 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 30)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def jpeg(path: Path | bytes, colour=(200, 30, 30)) -> None:
    with open(path, "wb") as f:  # bytes paths: names that are not UTF-8
        Image.new("RGB", (12, 10), colour).save(f, "JPEG")


def class_dir(root: Path, name: str = CLASS) -> Path:
    path = root / "train" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(root: Path, out: Path, *extra: str) -> int:
    return prep.main(["--input", str(root), "--output", str(out), "--workers", "1",
                      "--no-progress", *extra])


def samples_of(split_dir: Path) -> dict[str, dict]:
    """key -> json meta, over the manifest's shards (the standard library's tar reader)."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    found: dict[str, dict] = {}
    for shard in manifest["shards"]:
        with tarfile.open(split_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext != "json" or key not in found, f"{key} written twice"
                if ext == "json":
                    found[key] = json.loads(tar.extractfile(member).read())
    return found


def failures_of(split_dir: Path, name: str = "failures.jsonl") -> list[dict]:
    return [json.loads(line) for line in (split_dir / name).read_text().splitlines()]


# ---------------------------------------------------------------- names that are not UTF-8

def test_names_that_are_not_utf8_are_inputs_keyed_by_their_bytes(tmp_path, capsys):
    root = tmp_path / "in"
    folder = os.fsencode(class_dir(root))
    jpeg(folder + b"/\xff\xfe.JPEG")
    jpeg(folder + b"/caf\xe9.JPEG", (20, 200, 20))  # Latin-1, as old archives name files
    with open(folder + b"/\xfa.JPEG", "wb") as f:
        f.write(b"not an image")
    odd_class = os.fsencode(root / "train") + b"/n\xff"
    os.mkdir(odd_class)
    jpeg(odd_class + b"/plain.JPEG", (20, 20, 200))
    out = tmp_path / "out"

    assert run_stage(prep.main, ["--input", str(root), "--output", str(out), "--workers", "1",
                                 "--no-progress", "--max-failures", "1"]) == 0
    assert "3 samples in 1 shards" in capsys.readouterr().out
    split = out / "train"
    samples = samples_of(split)
    assert sorted(samples) == ["__", "caf_", "plain"]  # one `_` per byte outside [A-Za-z0-9_-]
    # `src` round-trips: JSON escapes os.listdir's surrogates, os.fsencode gives the bytes.
    assert os.fsencode(samples["__"]["src"]) == b"train/n00000001/\xff\xfe.JPEG"
    assert os.fsencode(samples["caf_"]["src"]) == b"train/n00000001/caf\xe9.JPEG"
    assert all((root / meta["src"]).is_file() for meta in samples.values())
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["classes"] == [CLASS, os.fsdecode(b"n\xff")]
    assert samples["plain"]["wnid"] == os.fsdecode(b"n\xff")
    (failure,) = failures_of(split)
    assert os.fsencode(failure["src"]) == b"train/n00000001/\xfa.JPEG"
    assert "not an image" in failure["reason"]
    (split / "failures.jsonl").read_text(encoding="ascii")  # escaped: any reader copes
    assert run(root, out, "--max-failures", "1") == 0  # a re-run resumes, same listing


def test_messages_about_names_that_are_not_utf8_are_printable():
    name = os.fsdecode(b"train/n\xff/x\xfe.JPEG")
    assert inputs.printable(name) == "train/n\\xff/x\\xfe.JPEG"
    assert inputs.printable(name).encode("ascii")
    assert inputs.printable("train/café.JPEG") == "train/café.JPEG"


# ---------------------------------------------------------------- links, loops, FIFOs

def test_link_loops_list_each_file_once_and_end(tmp_path, deadline):
    root = tmp_path / "in"
    a, b = class_dir(root, "n00000001"), class_dir(root, "n00000002")
    for i in range(3):
        jpeg(a / f"a{i}.JPEG")
        jpeg(b / f"b{i}.JPEG")
    (a / "loop").symlink_to(".")  # the whole class again, 40 levels deep
    (b / "up").symlink_to("..")  # two of these made the walk branch forever
    (b / "up2").symlink_to("..")
    expected = ([f"train/n00000001/a{i}.JPEG" for i in range(3)]
                + [f"train/n00000002/b{i}.JPEG" for i in range(3)])
    out = tmp_path / "out"
    assert run(root, out, "--max-failures", "3") == 0
    assert Counter(m["src"] for m in samples_of(out / "train").values()) == Counter(expected)
    loops = {f["src"]: f["reason"] for f in failures_of(out / "train")}
    assert sorted(loops) == ["train/n00000001/loop", "train/n00000002/up",
                             "train/n00000002/up2"]
    assert all(reason.startswith("directory loop") for reason in loops.values())
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert sorted(f["src"] for f in manifest["input_failures"]) == sorted(loops)
    assert (manifest["num_samples"], manifest["num_failures"], manifest["num_inputs"]) == (6, 3, 9)
    assert Counter(inputs.list_files(root, root / "train")) == Counter(expected)


def test_a_folder_reached_through_a_link_keeps_its_real_path_and_class(tmp_path, deadline):
    root = tmp_path / "in"
    a, b = class_dir(root, "n00000001"), class_dir(root, "n00000002")
    jpeg(b / "b0.JPEG")
    (a / "also_b").symlink_to("../n00000002")  # sorts before train/n00000002
    assert inputs.list_files(root, root / "train") == ["train/n00000002/b0.JPEG"]
    listing = inputs.scan_files(root, root / "train")
    assert [f["src"] for f in listing.failures] == ["train/n00000001/also_b"]


def test_entries_that_are_not_regular_files_are_failures_of_no_shard(tmp_path, deadline,
                                                                      monkeypatch):
    root = tmp_path / "in"
    folder = class_dir(root)
    jpeg(folder / "real.JPEG")
    (folder / "to_real.JPEG").symlink_to("real.JPEG")  # a link to a file is an input
    os.mkfifo(folder / "x.JPEG")  # opening it blocked the job forever
    (folder / "gone.JPEG").symlink_to(tmp_path / "nowhere")
    (folder / "ping.JPEG").symlink_to("pong.JPEG")
    (folder / "pong.JPEG").symlink_to("ping.JPEG")
    monkeypatch.chdir(folder)  # a socket path must be short
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock.JPEG")
    out = tmp_path / "out"
    try:
        assert run(root, out, "--max-failures", "5") == 0
    finally:
        server.close()
    assert sorted(samples_of(out / "train")) == ["real", "to_real"]
    failures = {Path(f["src"]).name: f for f in failures_of(out / "train")}
    assert sorted(failures) == ["gone.JPEG", "ping.JPEG", "pong.JPEG", "sock.JPEG", "x.JPEG"]
    assert all(f["shard"] is None for f in failures.values())
    assert "FIFO" in failures["x.JPEG"]["reason"]
    assert "socket" in failures["sock.JPEG"]["reason"]
    assert "broken symbolic link" in failures["gone.JPEG"]["reason"]
    assert "link loop" in failures["ping.JPEG"]["reason"]


def test_an_unreadable_directory_is_a_failure_not_silently_skipped(tmp_path, monkeypatch):
    # Tests run as root, for whom chmod 000 still reads: refuse the listing itself.
    root = tmp_path / "in"
    jpeg(class_dir(root, "n00000001") / "a.JPEG")
    jpeg(class_dir(root, "n00000002") / "b.JPEG")
    locked, real_scandir = str(root / "train" / "n00000002"), os.scandir

    def scandir(path="."):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert run(root, out, "--max-failures", "1") == 0
    assert [m["src"] for m in samples_of(out / "train").values()] == ["train/n00000001/a.JPEG"]
    assert failures_of(out / "train") == [{"src": "train/n00000002", "shard": None,
                                           "reason": "unreadable directory: Permission denied"}]


def test_listing_failures_are_in_every_part_and_once_after_merge(tmp_path, deadline):
    root = tmp_path / "in"
    folder = class_dir(root)
    for i in range(6):
        jpeg(folder / f"im{i}.JPEG")
    os.mkfifo(folder / "x.JPEG")
    common = ["--shard-size", "2", "--max-failures", "1"]
    assert run(root, tmp_path / "one", *common) == 0
    parts = tmp_path / "parts"
    for k in range(2):
        assert run(root, parts, *common, "--part", f"{k}/2") == 0
        part_failures = failures_of(parts / "train", f"failures.part-{k}-of-2.jsonl")
        assert [(f["src"], f["shard"]) for f in part_failures] == [("train/n00000001/x.JPEG",
                                                                    None)]
        part = json.loads((parts / "train" / f"manifest.part-{k}-of-2.json").read_text())
        assert [f["src"] for f in part["input_failures"]] == ["train/n00000001/x.JPEG"]
        assert part["num_failures"] == 1
    assert prep.main(["--merge", str(parts)]) == 0
    merged, one = parts / "train", tmp_path / "one" / "train"
    assert (merged / "failures.jsonl").read_text() == (one / "failures.jsonl").read_text()
    assert len(failures_of(merged)) == 1
    assert json.loads((merged / "manifest.json").read_text()) == \
        json.loads((one / "manifest.json").read_text())


@pytest.mark.parametrize("crafted", ["[]", '"options"', '{"options": 1, "input": NaN}',
                                     '{"options": 1, "input": [2]}'])
def test_a_crafted_job_record_is_refused_by_name(tmp_path, capsys, crafted):
    root, out = tmp_path / "in", tmp_path / "out"
    jpeg(class_dir(root) / "a.JPEG")
    assert run(root, out) == 0
    record = out / "train" / ".progress" / "job.json"
    assert record.is_file()
    record.write_text(crafted)
    capsys.readouterr()
    assert run_stage(prep.main, ["--input", str(root), "--output", str(out), "--workers", "1",
                                 "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert str(record) in message and "delete" in message and "Traceback" not in message
