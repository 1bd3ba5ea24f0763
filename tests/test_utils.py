"""Atomic writes, strict JSON and the CPU count that respects SLURM and affinity."""
import json
import os

import pytest

from pipeline import utils


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    utils.atomic_write_json(target, {"a": 1})
    utils.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_strict_json_replaces_non_finite():
    text = utils.dumps_json({"psnr": float("inf"), "x": [float("nan"), 1.5]})
    assert json.loads(text) == {"psnr": None, "x": [None, 1.5]}


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "model"
    with utils.atomic_dir(final) as d:
        (d / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with utils.atomic_dir(final) as d:
            (d / "w").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (final / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_available_cpus_prefers_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert utils.available_cpus() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert utils.available_cpus() == len(os.sched_getaffinity(0))
