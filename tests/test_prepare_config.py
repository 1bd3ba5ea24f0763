"""`pipeline prepare`'s typed config: today's options, defaults and messages, the job record
that earlier outputs were written with, the resolved config saved with the outputs, and a
stage that never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from pipeline import prepare as prep
from pipeline.config.fields import (build_config, config_fields, element_type, from_dict,
                                    validate)
from pipeline.prepare.options import ALIASES, PrepareConfig, job_options, option_flag
from pipeline.utils import PipelineError
from test_prepare_jobs import tiny_tree

REPO = Path(__file__).resolve().parents[1]
# `.progress/job.json` of `tiny_tree(root)` prepared with `--shard-size 2`, as the version
# before the typed config wrote it (byte for byte).
JOB_JSON_BEFORE = (
    '{\n  "options": {\n    "image_size": 64,\n    "resize": "center-crop",\n'
    '    "image_format": "png",\n    "quality": null,\n    "shard_size": 2,\n    "seed": 0,\n'
    '    "max_pixels": 89478485,\n    "decode_oversampling": 1.5\n  },\n  "input": {\n'
    '    "num_files": 6,\n    "listing_sha256": '
    '"95847205a2471a175f9f21581f2a434525019df9201646b7a990768f88e91983"\n  },\n'
    '  "classes_sha256": "f10699486843c87ae67d6a9bad3ef2af948ffa381c15f44cea77f7ca60b18683"\n}\n')


def config_of(argv: list[str]) -> PrepareConfig:
    args = prep.build_parser().parse_args(argv)
    return build_config(None, args, aliases=ALIASES, cls=PrepareConfig)


def saved_config(path: Path) -> PrepareConfig:
    return from_dict(PrepareConfig, yaml.safe_load(path.read_text()))


# ---------------------------------------------------------------- today's options

@pytest.mark.parametrize("argv, field, value", [
    (["--input", "ROOT"], "input", "ROOT"), (["--output", "OUT"], "output", "OUT"),
    (["--splits", "train,val"], "splits", "train,val"), (["--workers", "3"], "workers", 3),
    (["--part", "1/4"], "part", "1/4"), (["--resize", "box"], "resize", "box"),
    (["--image-format", "npy"], "image_format", "npy"),
    (["--image-format", "jpg", "--quality", "80"], "quality", 80),
    (["--image-size", "32"], "image_size", 32), (["--image_size", "32"], "image_size", 32),
    (["--shard-size", "5"], "shard_size", 5), (["--seed", "7"], "seed", 7),
    (["--max-failures", "2"], "max_failures", 2), (["--max-pixels", "100"], "max_pixels", 100),
    (["--decode-oversampling", "2"], "decode_oversampling", 2.0),
    (["--val-labels", "labels.csv"], "val_labels", "labels.csv"),
    (["--classes", "classes.txt"], "classes", "classes.txt"),
])
def test_every_option_of_today_sets_its_field(argv, field, value):
    config = config_of(argv)
    assert getattr(config, field) == value and type(getattr(config, field)) is type(value)


def test_merge_and_no_progress_stay_flags_outside_the_config():
    args = prep.build_parser().parse_args(["--merge", "OUT", "--no-progress"])
    assert (args.merge, args.no_progress) == ("OUT", True)
    assert "merge" not in {name for name, _, _ in config_fields(PrepareConfig)}


def test_defaults_are_those_of_the_options_they_replace():
    assert {name: getattr(PrepareConfig(), name) for name, _, _ in
            config_fields(PrepareConfig)} == {
        "image_size": 64, "resize": "center-crop", "image_format": "png", "quality": None,
        "shard_size": 3000, "seed": 0, "max_pixels": 89_478_485, "decode_oversampling": 1.5,
        "input": None, "output": "shards", "splits": None, "workers": None, "part": None,
        "max_failures": 0, "val_labels": None, "classes": None}
    assert config_of([]) == PrepareConfig()
    assert PrepareConfig(image_format="webp").quality == 90
    assert PrepareConfig(resize="box").decode_oversampling == 4.0


def test_the_job_record_keeps_its_field_names_order_and_values():
    config = PrepareConfig(input="elsewhere", workers=2, part="0/2", max_failures=5)
    assert list(job_options(config).items()) == [
        ("image_size", 64), ("resize", "center-crop"), ("image_format", "png"),
        ("quality", None), ("shard_size", 3000), ("seed", 0), ("max_pixels", 89_478_485),
        ("decode_oversampling", 1.5)]
    assert job_options(config) == job_options(config.shard_options())


# ---------------------------------------------------------------- declared ranges

NUMBERS = st.one_of(st.integers(-3, 6), st.integers(4090, 4100), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0.5, 1.5))
NUMERIC_FIELDS = [name for name, _, hint in config_fields(PrepareConfig)
                  if element_type(hint) in (int, float)]


@given(name=st.sampled_from(NUMERIC_FIELDS), value=NUMBERS)
@settings(max_examples=400, deadline=None, database=None)
def test_declared_ranges_and_the_messages_of_prepare_agree(name, value):
    field = next(f for dotted, f, _ in config_fields(PrepareConfig) if dotted == name)
    if isinstance(value, float) and name != "decode_oversampling":
        if not value.is_integer():
            return  # the command line refuses a fractional integer before any range
        value = int(value)
    extra = {"image_format": "jpg"} if name == "quality" else {}
    in_range = value in field.metadata["rule"].bounds
    try:
        config = PrepareConfig(**extra, **{name: value})
    except PipelineError as e:
        assert not in_range, (name, value, str(e))
        assert str(e).startswith(f"{option_flag(name)} must be"), str(e)
        return
    assert in_range, (name, value)
    validate(config, ALIASES)  # the generic check agrees


# ---------------------------------------------------------------- outputs

def test_an_output_of_the_previous_version_resumes(tmp_path, capsys):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    argv = ["--input", str(root), "--output", str(out), "--workers", "1", "--shard-size", "2",
            "--no-progress"]
    assert prep.main(argv) == 0
    job = out / "train" / ".progress" / "job.json"
    assert job.read_text() == JOB_JSON_BEFORE  # the same record, byte for byte
    job.write_text(JOB_JSON_BEFORE)
    capsys.readouterr()
    assert prep.main(argv) == 0
    assert "(3 already complete)" in capsys.readouterr().out


def test_the_resolved_config_is_saved_with_each_part(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    progress = out / "train" / ".progress"
    argv = ["--input", str(root), "--output", str(out), "--shard-size", "2",
            "--image-format", "webp", "--no-progress"]
    for k in (0, 1):
        assert prep.main(argv + ["--part", f"{k}/2"]) == 0
        expected = PrepareConfig(input=str(root), output=str(out), splits="train", workers=1,
                                 part=f"{k}/2", shard_size=2, image_format="webp")
        assert saved_config(progress / f"prepare.part-{k}-of-2.yaml") == expected
    assert not (progress / "prepare.yaml").exists()
    assert prep.main(["--merge", str(out)]) == 0

    whole = tmp_path / "whole"
    stale = whole / "train" / ".progress" / ".prepare.yaml.tmp-99999"
    assert prep.main(argv + ["--output", str(whole), "--workers", "1"]) == 0
    stale.write_text("left by a killed run")
    assert prep.main(argv + ["--output", str(whole), "--workers", "1", "--seed", "0"]) == 0
    saved = saved_config(whole / "train" / ".progress" / "prepare.yaml")
    assert (saved.part, saved.workers, saved.quality, saved.output) == ("0/1", 1, 90, str(whole))
    assert not stale.exists()


def test_a_refused_rerun_leaves_the_saved_config_of_the_run_that_made_the_shards(tmp_path):
    root, out = tiny_tree(tmp_path / "in"), tmp_path / "out"
    argv = ["--input", str(root), "--output", str(out), "--workers", "1", "--no-progress"]
    assert prep.main(argv + ["--shard-size", "2"]) == 0
    with pytest.raises(PipelineError, match="different options"):
        prep.main(argv + ["--shard-size", "3"])
    assert saved_config(out / "train" / ".progress" / "prepare.yaml").shard_size == 2


def test_a_library_split_name_with_a_comma_is_refused(tmp_path):
    root = tiny_tree(tmp_path / "in")
    with pytest.raises(PipelineError, match="not a split name"):
        prep.prepare(root, tmp_path / "out", ["train,val"], progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_never_imports_torch(tmp_path):
    root = tiny_tree(tmp_path / "in")
    code = ("import json, sys\nfrom pipeline.cli import main\n"
            f"rc = main(['prepare', '--input', {str(root)!r}, '--output', "
            f"{str(tmp_path / 'out')!r}, '--workers', '1', '--no-progress'])\n"
            "print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] == "
            "'torch')]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert json.loads(result.stdout.splitlines()[-1]) == [0, []], result.stderr
