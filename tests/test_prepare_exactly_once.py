"""`pipeline prepare` writes every input exactly once: chunking, the writer's and the
parent's refusals, and a property over generated jobs (input counts, shard sizes, parts,
kill points, failures) driven through the real planning/chunking/writing/resume/merge
code with a cheap stand-in for decoding."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import random
import tarfile
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st
from PIL import Image

from pipeline import prepare as prep
from pipeline.shards import DuplicateKeyError, ShardWriter, write_shard
from pipeline.utils import PipelineError

CLASSES = [f"n{i:08d}" for i in range(4)]
# Generated trees of thousands of files: creating a file costs ~0.5 ms on this VM's disk,
# ~15 µs in memory.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


# ---------------------------------------------------------------- chunks

@given(length=st.integers(0, 3000), taper=st.booleans())
@example(length=300, taper=True)  # the embedded sample tree's 300 images: 320 members before
@example(length=257, taper=True)
@example(length=1004, taper=True)
@settings(max_examples=200, deadline=None, database=None)
def test_chunks_hold_every_input_of_a_shard_once_in_order(length, taper):
    items = list(range(length))
    chunks = prep.split_chunks(items, taper)
    assert [i for chunk in chunks for i in chunk] == items
    assert all(0 < len(chunk) <= prep.CHUNK_SIZE for chunk in chunks)
    if taper and length >= prep.TAPER_IMAGES:  # the last 256+ go out in quarter chunks
        small = sum(len(c) for c in chunks if len(c) <= prep.TAPER_CHUNK_SIZE)
        assert prep.TAPER_IMAGES <= small < prep.TAPER_IMAGES + prep.CHUNK_SIZE


# ---------------------------------------------------------------- refusals

def test_shard_writer_refuses_a_key_it_has_already_written(tmp_path):
    path = tmp_path / "s.tar"
    with pytest.raises(DuplicateKeyError, match="'a' is already in this shard"):
        write_shard(path, [("a", {"cls": b"1"}), ("b", {"cls": b"2"}), ("a", {"cls": b"3"})])
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file

    writer = ShardWriter(path)
    writer.add("a", {"cls": b"1"})
    with pytest.raises(DuplicateKeyError):  # twice within one encoded chunk, too
        writer.add_encoded(*prep.encode_members([("b", {"cls": b"2"}), ("b", {"cls": b"3"})]))
    writer.add("c", {"cls": b"4"})
    info = writer.close()
    with tarfile.open(path) as tar:  # the refused call wrote nothing
        assert [m.name for m in tar.getmembers()] == ["a.cls", "c.cls"]
    assert (info.num_samples, info.first_key, info.last_key) == (2, "a", "c")


def chunk_tree(root: Path, n: int) -> Path:
    for i in range(n):
        path = root / "train" / CLASSES[i % 2] / f"im{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


@pytest.mark.parametrize("damage", ["repeat a key", "lose a sample", "fail a written sample",
                                    "swap two samples", "send a chunk twice"])
def test_a_chunk_that_is_not_exactly_its_planned_inputs_is_refused(tmp_path, monkeypatch,
                                                                   damage):
    root = chunk_tree(tmp_path / "in", 70)
    real = prep.process_chunk

    def faulty(task):
        result = real(task)
        if task.shard == 1 and task.chunk == 1:
            if damage == "repeat a key":
                result.keys[1] = result.keys[0]
            elif damage == "lose a sample":
                result.keys.pop()
            elif damage == "fail a written sample":
                result.failures.append({"src": task.items[0].src, "reason": "?"})
            elif damage == "swap two samples":
                result.keys[0], result.keys[1] = result.keys[1], result.keys[0]
        return result

    def doubled(tasks):
        for result in map(faulty, tasks):
            yield result
            if damage == "send a chunk twice" and (result.shard, result.chunk) == (1, 0):
                yield result

    monkeypatch.setattr(prep.pool, "sample_members", stand_in_members)
    monkeypatch.setattr(prep.run, "executor", lambda workers: _yielding(doubled))
    with pytest.raises(PipelineError, match="train-000001.tar: chunk") as info:
        prep.prepare(root, tmp_path / "out", ["train"], prep.Options(shard_size=40),
                     workers=1, progress=False)
    assert "nothing of that shard was kept" in str(info.value)
    split = tmp_path / "out" / "train"
    assert not [p for p in split.rglob("*") if ".tmp-" in p.name]
    assert not (split / "train-000001.tar").exists()
    assert not (split / ".progress" / "train-000001.tar.json").exists()


class _yielding:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- end to end, real images

def test_300_real_images_in_one_shard_with_two_workers_are_each_written_once(tmp_path):
    """One shard of 300 (the default --shard-size holds the sample tree's 300 train
    images): its last 268 inputs are tapered, which wrote 20 of them twice."""
    wds = pytest.importorskip("webdataset")
    root = tmp_path / "in"
    srcs = []
    for i in range(300):
        path = root / "train" / CLASSES[i % 3] / f"{CLASSES[i % 3]}_{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (9 + i % 5, 8), (i % 256, 40, 90)).save(path, "JPEG")
        srcs.append(path.relative_to(root).as_posix())
    (root / "train" / CLASSES[0] / "broken.JPEG").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "out"
    assert prep.main(["--input", str(root), "--output", str(out), "--workers", "2",
                      "--max-failures", "1", "--no-progress"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [300]
    urls = [str(out / "train" / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    keys = Counter(s["__key__"] for s in samples)
    assert keys == Counter(Path(src).stem for src in srcs)  # each exactly once
    assert sorted(json.loads(s["json"])["src"] for s in samples) == sorted(srcs)
    failures = (out / "train" / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["src"] for line in failures] == ["train/n00000000/broken.JPEG"]


# ---------------------------------------------------------------- property over jobs

def stand_in_members(item, root, options, reduced_decode=True):
    """Decoding's stand-in: an input whose bytes are b"bad" fails, as an unlabelled one
    does; any other becomes one member naming its source (cheap to write and read back)."""
    if item.wnid is None:
        raise prep.BadInput("no label: not inside a class folder")
    try:
        data = (root / item.src).read_bytes()
    except OSError as e:
        raise prep.BadInput(f"unreadable: {e.strerror}") from None
    if data == b"bad":
        raise prep.BadInput("not an image: injected")
    return {"json": json.dumps({"src": item.src, "label": item.label}).encode()}


@dataclass(frozen=True)
class Case:
    n: int  # files inside class folders
    classes: int
    twins: bool  # pairs of files with the same name in two class folders (hashed keys)
    bad_every: int  # every k-th file is not an image (0: none)
    unlabelled: int  # files directly in train/ (no class: failures)
    broken_links: int  # entries that are not inputs (listing failures, in no shard)
    fifo: bool
    loop: bool
    shard_size: int
    workers: int  # > 1: results come back in a pool's order (simulated_pool)
    parts: int
    kills: tuple[int | None, ...]  # per part: interrupted after k chunk results, or not
    debris: bool  # a SIGKILL's leftovers planted after each interruption


@st.composite
def cases(draw) -> Case:
    n = draw(st.integers(1, 3000))
    classes = draw(st.integers(1, 4))
    total = n + 2  # a bound on the inputs, to keep the shard count small
    shard_size = draw(st.integers(max(1, total // 40), total + 300))
    parts = draw(st.integers(1, 4))
    kill = st.one_of(st.none(), st.integers(0, 3 * total // prep.TAPER_CHUNK_SIZE + 2))
    return Case(n, classes, classes > 1 and draw(st.booleans()),
                draw(st.sampled_from([0, 0, 2, 7, 97])), draw(st.integers(0, 2)),
                draw(st.integers(0, 2)), draw(st.booleans()), draw(st.booleans()),
                shard_size, draw(st.integers(1, 8)), parts,
                tuple(draw(kill) for _ in range(parts)), draw(st.booleans()))


@contextmanager
def simulated_pool(workers: int):
    """A pool's completion order without processes: like prep.map_unordered, up to
    4 x workers tasks in flight, finishing in any order (seeded by the worker count)."""
    order = random.Random(workers)

    def run_map(tasks):
        pending = []
        for task in tasks:
            pending.append(prep.process_chunk(task))
            if len(pending) >= 4 * workers:
                yield pending.pop(order.randrange(len(pending)))
        while pending:
            yield pending.pop(order.randrange(len(pending)))

    yield run_map if workers > 1 else (lambda tasks: map(prep.process_chunk, tasks))


@dataclass
class Tree:
    root: Path
    keys: dict[str, str]  # src -> the key it must be written under (documented rule)
    failing: list[str]  # inputs that must be listed as failures of their shard
    not_inputs: list[str]  # entries that must be listed as failures of no shard


def make_tree(base: Path, case: Case) -> Tree:
    root = base / "in"
    train = root / "train"
    stems, failing = {}, []
    for i in range(case.n):
        stem = f"im{i // 2}" if case.twins else f"im{i}"
        src = f"train/{CLASSES[i % case.classes]}/{stem}.JPEG"
        (root / src).parent.mkdir(parents=True, exist_ok=True)
        bad = case.bad_every and i % case.bad_every == 0
        (root / src).write_bytes(b"bad" if bad else b"ok")
        stems[src] = stem
        if bad:
            failing.append(src)
    for i in range(case.unlabelled):
        (train / f"loose{i}.JPEG").write_bytes(b"ok")
        failing.append(f"train/loose{i}.JPEG")
    not_inputs = []
    for i in range(case.broken_links):
        (train / CLASSES[0] / f"gone{i}.JPEG").symlink_to(base / "nowhere")
        not_inputs.append(f"train/{CLASSES[0]}/gone{i}.JPEG")
    if case.fifo:
        os.mkfifo(train / CLASSES[0] / "pipe.JPEG")
        not_inputs.append(f"train/{CLASSES[0]}/pipe.JPEG")
    if case.loop:
        (train / CLASSES[0] / "again").symlink_to("..")
        not_inputs.append(f"train/{CLASSES[0]}/again")
    counts, failed = Counter(stems.values()), set(failing)
    keys = {src: stem if counts[stem] == 1 else
            f"{stem}_{hashlib.sha1(src.encode()).hexdigest()[:10]}"
            for src, stem in stems.items() if src not in failed}
    return Tree(root, keys, failing, not_inputs)


class SimulatedKill(BaseException):
    """What a SIGKILL interrupts: nothing in prepare may catch it."""


def run_part(tree: Tree, out: Path, case: Case, part: tuple[int, int],
             kill_after: int | None) -> None:
    options = prep.Options(shard_size=case.shard_size)
    if kill_after is not None:
        real, calls = prep.process_chunk, itertools.count()

        def dying(task):
            if next(calls) == kill_after:
                raise SimulatedKill
            return real(task)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(prep, "process_chunk", dying)
            try:
                prep.prepare(tree.root, out, ["train"], options, workers=case.workers,
                             part=part, progress=False)
            except SimulatedKill:
                assert not temporaries(out)  # an interrupted job cleans up after itself
                if case.debris:
                    plant_debris(out / "train", part)
    prep.prepare(tree.root, out, ["train"], options, workers=case.workers, part=part,
                 progress=False)


def plant_debris(split_dir: Path, part: tuple[int, int]) -> None:
    """What a SIGKILL leaves: temporaries of this part's shards, records and manifest."""
    name = prep.shard_name("train", part[0])
    for stale in (f".{name}.tmp-99999", f".{prep.manifest_name(part)}.tmp-99998",
                  f"{prep.PROGRESS_DIR}/.{name}.json.tmp-99997"):
        (split_dir / stale).write_bytes(b"half written by a killed job")


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name]


def read_back(split_dir: Path) -> tuple[dict, list[dict], dict[str, bytes], dict[str, list]]:
    manifest = json.loads((split_dir / "manifest.json").read_text())
    failures = [json.loads(line) for line in
                (split_dir / "failures.jsonl").read_text().splitlines()]
    tars = {s["name"]: (split_dir / s["name"]).read_bytes() for s in manifest["shards"]}
    samples = {}
    for name, data in tars.items():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the standard library's reader
            samples[name] = [(m.name.split(".", 1)[0], json.loads(tar.extractfile(m).read()))
                             for m in tar.getmembers()]
    return manifest, failures, tars, samples


def check_exactly_once(tree: Tree, case: Case, split_dir: Path) -> None:
    manifest, failures, _, samples = read_back(split_dir)
    written = [(key, meta["src"]) for shard in samples.values() for key, meta in shard]
    assert Counter(key for key, _ in written) == Counter(tree.keys.values())  # once each
    assert all(tree.keys[src] == key for key, src in written)
    in_shards = Counter(f["src"] for f in failures if f["shard"] is not None)
    assert in_shards == Counter(tree.failing)
    assert Counter(f["src"] for f in failures if f["shard"] is None) == Counter(tree.not_inputs)
    assert Counter(src for _, src in written) + in_shards == Counter(
        [*tree.keys, *tree.failing])  # every listed input is a sample or a failure, once
    num_inputs = len(tree.keys) + len(tree.failing)
    assert manifest["num_shards"] == len(manifest["shards"]) == math.ceil(
        num_inputs / case.shard_size)
    for shard in manifest["shards"]:
        assert shard["num_samples"] == len(samples[shard["name"]])
    assert manifest["num_samples"] == len(written)
    assert manifest["num_failures"] == len(failures)
    assert manifest["num_inputs"] == len(written) + len(failures)


@given(case=cases())
@example(case=Case(300, 1, False, 0, 0, 0, False, False, 3000, 1, 1, (None,), False))
@example(case=Case(257, 3, True, 7, 0, 1, True, True, 300, 2, 2, (3, None), True))
@example(case=Case(1004, 2, False, 97, 0, 2, False, True, 400, 4, 3, (None, 40, 0), True))
@settings(max_examples=50, deadline=None, database=None)
def test_any_job_writes_each_input_once_and_parts_merge_to_the_one_machine_run(case):
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(prep.pool, "sample_members", stand_in_members)
        mp.setattr(os, "fsync", lambda fd: None)  # durability is not what this checks
        mp.setattr(prep.manifest, "provenance", lambda: {"git_commit": None, "versions": {}})
        mp.setattr(prep.run, "executor", simulated_pool)
        base = Path(tmp)
        tree = make_tree(base, case)
        reference = base / "one"
        prep.prepare(tree.root, reference, ["train"], prep.Options(shard_size=case.shard_size),
                     workers=1, progress=False)  # in order, as the one-worker job runs
        check_exactly_once(tree, case, reference / "train")

        out = base / "parts"
        for k in range(case.parts):
            run_part(tree, out, case, (k, case.parts), case.kills[k])
        if case.parts > 1:
            part_manifest = json.loads(
                (out / "train" / prep.manifest_name((0, case.parts))).read_text())
            assert Counter(f["src"] for f in part_manifest["input_failures"]) == Counter(
                tree.not_inputs)
            prep.merge(out)
        assert not temporaries(out)
        merged, one = read_back(out / "train"), read_back(reference / "train")
        assert merged[0] == one[0]  # manifests
        assert merged[1] == one[1]  # failures.jsonl
        assert merged[2] == one[2]  # shard bytes
