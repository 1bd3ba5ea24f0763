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


def test_atomic_dir_keeps_the_previous_result_when_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with utils.atomic_dir(final) as d:
        (d / "w").write_text("v1")
    real_replace = os.replace

    def failing_second_rename(src, dst):
        if os.path.basename(src).startswith(".model.tmp-"):  # the new result's rename
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", failing_second_rename)
    with pytest.raises(OSError):
        with utils.atomic_dir(final) as d:
            (d / "w").write_text("v2")
    assert (final / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_removes_its_temporary_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    utils.atomic_write_json(target, {"a": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.os, "fsync", full_disk)
    with pytest.raises(OSError):
        utils.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_output_errors_become_one_line_with_exit_2(capsys):
    from pipeline.cli import run_stage

    def fails(argv):
        raise OSError(28, "No space left on device", "/out/x.tar")

    assert run_stage(fails, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/out/x.tar" in err and "free space" in err


def test_record_once_writes_first_then_returns_what_is_there(tmp_path):
    path = tmp_path / "progress" / "job.json"
    assert utils.record_once(path, {"seed": 1}, "job record", "delete it") is None
    assert json.loads(path.read_text()) == {"seed": 1}
    assert utils.record_once(path, {"seed": 2}, "job record", "delete it") == {"seed": 1}
    assert json.loads(path.read_text()) == {"seed": 1}  # never overwritten


@pytest.mark.parametrize("text,reason", [("[1, 2]", "is not a JSON object"),
                                          ('{"seed": NaN}', "NaN is not a JSON number"),
                                          ("{", "Expecting")])
def test_record_once_refuses_a_crafted_record_by_name(tmp_path, text, reason):
    path = tmp_path / "job.json"
    path.write_text(text)
    with pytest.raises(utils.PipelineError, match=f"job record {path}.*{reason}.*delete it"):
        utils.record_once(path, {"seed": 1}, "job record", "delete it")
