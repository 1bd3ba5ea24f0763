"""`pipeline evaluate` against hostile or broken surroundings: crafted config.json values,
a second job on the same --output, out-of-range options, a full disk while writing, and
crafted pickles given as weight files."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import evaluate as evaluate_module
from pipeline.locking import acquire, holder_of

FAST = ["--num-workers", "0", "--batch-size", "16", "--throughput-batches", "1"]


@pytest.fixture(scope="module")
def val16(tmp_path_factory) -> Path:
    """16 val samples: exactly the fixed images, so a whole evaluation takes a moment."""
    from shardgen import make_split

    return make_split(tmp_path_factory.mktemp("val16"), "val", 16, 16)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny untrained AE export of the run `ae`, step 7."""
    from pipeline.config import Config, ModelConfig
    from pipeline.models import build_model, save_pretrained

    cfg = ModelConfig(model="ae", widths=[8, 16, 32], latent_channels=32)
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("runs") / "ae"
    return save_pretrained(build_model(cfg), run_dir / "model", Config(model=cfg), step=7,
                           run_dir=run_dir)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """main() runs in this process: drop Accelerate's singleton state afterwards."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def evaluate(args: list) -> int:
    from pipeline.cli import run_stage

    return run_stage(evaluate_module.main, [str(a) for a in args])


def crafted(export: Path, where: Path, **fields) -> Path:
    """A copy of `export` whose config.json has `fields` replaced (None: key removed)."""
    copy = where / "model"
    shutil.copytree(export, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def snapshot(root: Path, skip: Path) -> dict[str, bytes | None]:
    """Every path under root (outside `skip`) with its content; None for directories."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*")) if skip != p and skip not in p.parents}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- names from config.json

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_safe_component_is_one_harmless_path_component(text):
    name = evaluate_module.safe_component(text)
    assert all(c.isalnum() or c in "_.+-" for c in name)  # no separator, space or control
    assert name not in (".", "..")
    assert not name.startswith((".", "-")) and len(name.encode("utf-8")) <= 100
    if name:
        assert Path("/out", name).parent == Path("/out") and Path(name).name == name


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,40}[A-Za-z0-9]", fullmatch=True))
def test_readable_names_stay_as_they_are(name):
    assert evaluate_module.safe_component(name) == name


# config.json fields -> (directory and metrics.json name, metrics.json run) expected.
# {elsewhere} is an absolute directory outside --output.
CRAFTED_NAMES = {
    "absolute": ({"run_name": "{elsewhere}/x"}, "{elsewhere_flat}_x-step7", "{elsewhere}/x"),
    "dotdot": ({"run_name": "0/../../victim"}, "0_.._.._victim-step7", "0/../../victim"),
    "parent": ({"run_name": ".."}, "ae-step7", "ae"),  # unusable: the run directory's name
    "empty": ({"run_name": "", "run_dir": "/"}, "model-step7", "model"),  # the checkpoint's
    "spaces": ({"run_name": "my run\n\t(v2)"}, "my_run_v2-step7", "my run\n\t(v2)"),
    "readable": ({"run_name": "vae-basic"}, "vae-basic-step7", "vae-basic"),
}


def test_crafted_run_names_stay_inside_output(export, val16, tmp_path, capsys):
    """Nothing is written or replaced outside --output; the names stay recognisable."""
    out = tmp_path / "eval"
    (tmp_path / "victim-step7").mkdir()  # where "0/../../victim" leads
    (tmp_path / "victim-step7" / "keep.txt").write_text("precious")
    elsewhere = Path(tempfile.mkdtemp(prefix="ev"))  # short: its flat name is not cut
    try:
        subst = {"elsewhere": str(elsewhere),
                 "elsewhere_flat": str(elsewhere).strip("/").replace("/", "_")}
        paths, expected = [], {}
        for key, (fields, name, run) in CRAFTED_NAMES.items():
            fields = {k: v.format(**subst) for k, v in fields.items()}
            paths.append(crafted(export, tmp_path / "ckpts" / key, **fields))
            expected[name.format(**subst)] = run.format(**subst)
        before = snapshot(tmp_path, skip=out)
        assert evaluate([*paths, "--shards", val16, "--output", out, *FAST]) == 0
        assert snapshot(tmp_path, skip=out) == before
        assert list(elsewhere.iterdir()) == []
    finally:
        shutil.rmtree(elsewhere)
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, ".lock"])
    for name, run in expected.items():
        record = json.loads((out / name / "metrics.json").read_text())
        assert (record["name"], record["run"], record["step"]) == (name, run, 7)
    assert "my_run_v2-step7" in capsys.readouterr().out  # the summary table uses the name


def test_report_shows_the_sanitised_names(export, val16, tmp_path):
    from pipeline import report

    out = tmp_path / "eval"
    ckpt = crafted(export, tmp_path / "c", run_name="runs/../my run")
    assert evaluate([ckpt, "--shards", val16, "--output", out, *FAST]) == 0
    assert report.main([str(out), "--output", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| runs_.._my_run-step7 |" in md


@pytest.mark.parametrize("fields, message", [
    ({"step": "7/../../../victim"}, "'step' must be an integer >= 0, got '7/../../../victim'"),
    ({"step": -1}, "'step' must be an integer >= 0, got -1"),
    ({"step": 7.5}, "'step' must be an integer >= 0, got 7.5"),
    ({"step": True}, "'step' must be an integer >= 0, got True"),
    ({"step": 2 ** 64}, "'step' must be an integer >= 0"),
    ({"step": None}, "'step' must be an integer >= 0, got None"),
    ({"run_name": ["a", "b"]}, "'run_name' must be a string or null, got ['a', 'b']"),
    ({"run_name": 5}, "'run_name' must be a string or null, got 5"),
    ({"run_name": None, "run_dir": {"x": 1}}, "'run_dir' must be a string or null"),
])
def test_invalid_identity_is_refused_before_anything_is_written(export, val16, tmp_path,
                                                               capsys, fields, message):
    ckpt = crafted(export, tmp_path / "c", **fields)
    before = snapshot(tmp_path, skip=tmp_path / "out")
    assert evaluate([ckpt, "--shards", val16, "--output", tmp_path / "out", *FAST]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"checkpoint {ckpt}: {ckpt / 'config.json'}: {message}" in line
    assert not (tmp_path / "out").exists() and snapshot(tmp_path, tmp_path / "out") == before


def test_a_link_in_output_is_not_followed(export, val16, tmp_path, capsys):
    out = tmp_path / "out"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    out.mkdir()
    (out / "ae-step7").symlink_to(target)
    assert evaluate([export, "--shards", val16, "--output", out, *FAST]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'ae-step7'} is a link or leads out of --output" in line
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ae-step7"]


# ---------------------------------------------------------------- one job per --output

def test_second_evaluate_into_the_same_output_is_refused(export, val16, tmp_path, capsys):
    out = tmp_path / "out"
    with acquire(out / ".lock", f"--output {out}"):  # another job, as far as flock can tell
        assert evaluate([export, "--shards", val16, "--output", out, *FAST]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert f"--output {out} is in use by another job: pid {os.getpid()}" in line
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert evaluate([export, "--shards", val16, "--output", out, *FAST]) == 0
    assert (out / "ae-step7" / "metrics.json").is_file()
    assert holder_of(out / ".lock") is None  # released when the run ended


# ---------------------------------------------------------------- option ranges

@pytest.mark.parametrize("option, value, message", [
    ("--vae-sigma", "nan", "--vae-sigma must be in (0, 1]"),
    ("--vae-sigma", "inf", "--vae-sigma must be in (0, 1]"),
    ("--vae-sigma", "0", "--vae-sigma must be in (0, 1]"),
    ("--vae-sigma", "-0.1", "--vae-sigma must be in (0, 1]"),
    ("--vae-sigma", "1.5", "--vae-sigma must be in (0, 1]"),
    ("--batch-size", "0", "--batch-size must be between 1 and 65536, got 0"),
    ("--batch-size", "100000", "--batch-size must be between 1 and 65536, got 100000"),
    ("--num-workers", "-1", "--num-workers must be between 0 and 256, got -1"),
    ("--num-workers", "1000", "--num-workers must be between 0 and 256, got 1000"),
    ("--max-samples", "0", "--max-samples must be >= 1, got 0"),
    ("--worst-k", "0", "--worst-k must be between 1 and 10000, got 0"),
    ("--worst-k", "100000", "--worst-k must be between 1 and 10000"),
    ("--throughput-batches", "0", "--throughput-batches must be between 1 and 10000, got 0"),
    ("--project", "team/project", "--project 'team/project': 1 to 128 characters"),
    ("--project", "", "--project '': 1 to 128 characters"),
    ("--run-name", " ", "--run-name must not be empty"),
])
def test_out_of_range_options_are_refused(export, val16, tmp_path, capsys, option, value,
                                          message):
    out = tmp_path / "out"
    assert evaluate([export, "--shards", val16, "--output", out, *FAST, option, value]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line
    assert not out.exists()


def test_output_that_is_a_file_is_refused(export, val16, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert evaluate([export, "--shards", val16, "--output", tmp_path / "file", *FAST]) == 2
    assert f"--output {tmp_path / 'file'}: exists and is not a directory" in \
        capsys.readouterr().err


def test_images_too_small_for_ms_ssim_are_refused(tmp_path, capsys):
    from shardgen import make_split

    from pipeline.config import Config, ModelConfig
    from pipeline.models import build_model, save_pretrained

    cfg = ModelConfig(model="ae", image_size=32, widths=[8, 16], latent_channels=16)
    ckpt = save_pretrained(build_model(cfg), tmp_path / "run" / "model", Config(model=cfg),
                           step=1, run_dir=tmp_path / "run")
    val = make_split(tmp_path, "val32", 16, 16, size=32)
    assert evaluate([ckpt, "--shards", val, "--output", tmp_path / "out", *FAST]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "hold 32x32 images: 3-scale MS-SSIM needs at least 41 px" in line


# ---------------------------------------------------------------- full disk while writing

def test_full_disk_while_writing_leaves_nothing_partial(export, val16, tmp_path, capsys,
                                                        monkeypatch):
    out = tmp_path / "out"
    second = crafted(export, tmp_path / "second", run_name="second")
    assert evaluate([export, "--shards", val16, "--output", out, *FAST]) == 0
    previous = snapshot(out / "ae-step7", skip=out / "none")
    capsys.readouterr()

    real_write_json = evaluate_module.atomic_write_json

    def full_disk_for_second(path, obj):  # the image strips are already in the temporary
        if obj["name"] == "second-step7":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, obj)

    monkeypatch.setattr(evaluate_module, "atomic_write_json", full_disk_for_second)
    # ae is evaluated again first (replacing its result), then second fails.
    assert evaluate([export, second, "--shards", val16, "--output", out, *FAST]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "No space left on device" in line and "free space on that file system" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ae-step7"]  # no temporary
    assert set(snapshot(out / "ae-step7", skip=out / "none")) == set(previous)
    assert holder_of(out / ".lock") is None

    # A failure while replacing an existing result keeps the previous one whole.
    def read_only(path, obj):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(evaluate_module, "atomic_write_json", read_only)
    before = snapshot(out / "ae-step7", skip=out / "none")
    assert evaluate([export, "--shards", val16, "--output", out, *FAST]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "Read-only file system" in line
    assert snapshot(out / "ae-step7", skip=out / "none") == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ae-step7"]


# ---------------------------------------------------------------- crafted pickles

class _Touch:
    """Unpickling this creates `marker`: what a crafted weight file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_pickle(path: Path, marker: Path) -> Path:
    torch.save({"features.0.weight": _Touch(marker), "lin0.model.1.weight": _Touch(marker)},
               path)
    return path


def test_the_crafted_pickle_would_run_code(tmp_path):
    """The control: loaded unsafely, the file does create its marker."""
    marker = tmp_path / "ran"
    torch.load(crafted_pickle(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("option", ["--lpips-backbone", "--lpips-linear", "--inception-weights"])
def test_weight_files_are_never_unpickled(export, val16, tmp_path, capsys, option):
    if option == "--inception-weights":
        pytest.importorskip("torch_fidelity")
    marker = tmp_path / "ran"
    evil = crafted_pickle(tmp_path / "evil.pth", marker)
    extra = [option, evil]
    if option == "--lpips-linear":
        good = tmp_path / "alexnet.pth"
        torch.save({}, good)  # read after the linear file, so it never matters
        extra += ["--lpips-backbone", good]
    assert evaluate([export, "--shards", val16, "--output", tmp_path / "out", *FAST,
                     *extra]) == 2
    assert not marker.exists()  # torch-fidelity's own loader would have created it
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{option} {evil}: not a readable torch state dict of tensors" in line
    assert not (tmp_path / "out" / "ae-step7").exists()
