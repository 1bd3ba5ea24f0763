"""Manifests are data: crafted manifests are refused with an error naming the file and the shard.

Every way in reads through `shards.read_manifest`: a split directory, a manifest path, a
brace pattern beside a manifest (`_neighbour_manifest`) and `manifest_hash` (evaluate).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.data import make_loader
from pipeline.shards import manifest_hash, read_manifest, write_shard
from pipeline.utils import PipelineError
from shardgen import make_split

REGENERATE = "regenerate it with `pipeline prepare`"


@pytest.fixture
def split(tmp_path) -> Path:
    """3 shards of 4, 3 and 0 samples (an empty shard is valid)."""
    out = make_split(tmp_path, "val", 7, 4, size=8)
    manifest = json.loads((out / "manifest.json").read_text())
    empty = write_shard(out / "val-000002.tar", [])  # a tar with no members
    manifest["shards"].append(empty.to_dict())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def rewrite(split: Path, change) -> Path:
    manifest = json.loads((split / "manifest.json").read_text())
    change(manifest)
    (split / "manifest.json").write_text(json.dumps(manifest))
    return split / "manifest.json"


def set_count(value):
    def change(manifest):
        manifest["shards"][1]["num_samples"] = value
    return change


def test_a_valid_manifest_with_an_empty_shard_loads(split):
    assert [s["num_samples"] for s in read_manifest(split)["shards"]] == [4, 3, 0]
    loader = make_loader(split, 4, mode="eval", num_workers=0)
    assert len([k for _, _, keys in loader for k in keys]) == loader.expected_total == 7


@pytest.mark.parametrize("value", [-1, 2.5, 3.0, "3", True, None, [3], {"n": 3}])
def test_a_shard_count_that_is_not_an_integer_of_zero_or_more_is_refused(split, value):
    path = rewrite(split, set_count(value))
    message = (rf"shard manifest {re.escape(str(path))}: shard 'val-000001.tar' has "
               rf"num_samples {re.escape(repr(value))}, not an integer >= 0: "
               rf"{re.escape(REGENERATE)}")
    with pytest.raises(PipelineError, match=message):
        read_manifest(split)
    with pytest.raises(PipelineError, match=message):
        make_loader(split, 4, mode="eval", num_workers=0)
    with pytest.raises(PipelineError, match=message):  # a brace pattern beside the manifest
        make_loader(f"{split}/val-{{000000..000001}}.tar", 4, mode="eval", num_workers=0)


def test_a_shard_without_a_count_is_refused(split):
    path = rewrite(split, lambda m: m["shards"][0].pop("num_samples"))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: shard 'val-000000.tar' "
                                            rf"has num_samples None"):
        make_loader(split, 4, num_workers=0)


@pytest.mark.parametrize("total", [8, 6, "7", 7.0, None])
def test_num_samples_must_equal_the_sum_of_the_shard_counts(split, total):
    path = rewrite(split, lambda m: m.update(num_samples=total))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: num_samples is "
                                            rf"{re.escape(repr(total))}, but its shards hold 7 "
                                            rf"samples: {re.escape(REGENERATE)}"):
        make_loader(split, 4, mode="eval", num_workers=0)


@pytest.mark.parametrize("size", [0, -8, "8", 8.0, True, None])
def test_image_size_must_be_a_positive_integer(split, size):
    path = rewrite(split, lambda m: m.update(image_size=size))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: image_size "
                                            rf"{re.escape(repr(size))} is not a positive integer"):
        read_manifest(split)


@pytest.mark.parametrize("classes", ["n0,n1", None, {"n0": 0}])
def test_classes_must_be_a_list(split, classes):
    path = rewrite(split, lambda m: m.update(classes=classes))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: classes is a "
                                            rf"{type(classes).__name__}, not a list"):
        read_manifest(split)


@pytest.mark.parametrize("shards,message", [
    ({"val-000000.tar": 4}, r"shards is dict, not a list of shard entries"),
    ("val-000000.tar", r"shards is str, not a list"),
    (["val-000000.tar"], r"shards\[0\] is a str, not an object with a name and num_samples")])
def test_shards_must_be_a_list_of_entries(split, shards, message):
    path = rewrite(split, lambda m: m.update(shards=shards))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: {message}"):
        make_loader(split, 4, mode="eval", num_workers=0)


def test_a_shard_listed_twice_is_refused(split):
    def duplicate(manifest):
        manifest["shards"][1] = {**manifest["shards"][0]}
        manifest["num_samples"] = 8
    path = rewrite(split, duplicate)
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))} lists shard "
                                            rf"'val-000000.tar' twice"):
        make_loader(split, 4, mode="eval", num_workers=0)


@pytest.mark.parametrize("name", [None, "", 7, "pipe:cat x.tar", "../x.tar", "/abs/x.tar"])
def test_shard_names_must_be_plain_relative_file_names(split, name):
    path = rewrite(split, lambda m: m["shards"][1].update(name=name))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))} lists shard "
                                            rf"{re.escape(repr(name))}, which is not a plain "
                                            rf"file name.*never opened as URLs or run as commands"):
        read_manifest(split)


@pytest.mark.parametrize("content", ["[]", "7", "not json", b"\xff\xfe{"])
def test_a_manifest_that_is_not_a_json_object_is_refused(split, content):
    path = split / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}"):
        read_manifest(split)


def test_manifest_hash_needs_every_shard_hash(split):
    assert len(manifest_hash(split)) == 16
    path = rewrite(split, lambda m: m["shards"][1].pop("sha256"))
    with pytest.raises(PipelineError, match=rf"{re.escape(str(path))}: shard 'val-000001.tar' "
                                            rf"has no sha256"):
        manifest_hash(split)
