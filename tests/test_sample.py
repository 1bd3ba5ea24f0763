"""The embedded sample tree (`pipeline.sampledata`, formerly `pipeline.sample`) and the
benchmark JPEGs (`pipeline.bench.jpegs`)."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import sample
from pipeline.utils import PipelineError

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 12, 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sample") / "tree"
    counts = sample.write_sample_tree(root, NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS,
                                      seed=0, progress=False)
    return root, counts


def val_labels(root: Path) -> dict[str, list[list[str]]]:
    """ImageId -> list of [wnid, xmin, ymin, xmax, ymax] groups, read as Kaggle's CSV."""
    with open(root / "LOC_val_solution.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["ImageId", "PredictionString"]
        rows = list(reader)
    labels = {}
    for row in rows:
        fields = row["PredictionString"].split()
        assert len(fields) % 5 == 0 and fields, row
        labels[row["ImageId"]] = [fields[i:i + 5] for i in range(0, len(fields), 5)]
    assert len(labels) == len(rows), "duplicate ImageId rows"
    return labels


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32)


def neighbour_correlation(pixels: np.ndarray) -> float:
    return float(np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1])


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != sample.RECORD_NAME}


# ---------------------------------------------------------------- layout

def test_layout_and_counts(tree):
    root, counts = tree
    wnids = counts["classes"]
    assert counts["train"] == NUM_CLASSES * TRAIN_PER_CLASS
    assert counts["val"] == NUM_CLASSES * VAL_PER_CLASS
    assert wnids == sorted(wnids) and len(set(wnids)) == NUM_CLASSES
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert sorted(p.name for p in (root / "train").iterdir()) == wnids
    for wnid in wnids:
        names = [p.name for p in (root / "train" / wnid).iterdir()]
        assert len(names) == TRAIN_PER_CLASS
        assert all(re.fullmatch(rf"{wnid}_\d+\.JPEG", n) for n in names), names
    val_names = sorted(p.name for p in (root / "val").iterdir())
    assert val_names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, counts["val"] + 1)]
    assert {p.name for p in root.iterdir()} == {"train", "val", "LOC_val_solution.csv",
                                                "LOC_synset_mapping.txt", "sample.json"}


def test_every_file_is_a_jpeg(tree):
    root, _ = tree
    files = list(root.rglob("*.JPEG"))
    modes = set()
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG", path
            modes.add(img.mode)
    assert modes == {"RGB", "L"}  # a few greyscale files, as in ImageNet


def test_val_csv_labels_every_val_image_with_boxes_inside_it(tree):
    root, counts = tree
    labels = val_labels(root)
    assert set(labels) == {p.stem for p in (root / "val").iterdir()}
    per_class = {w: 0 for w in counts["classes"]}
    for image_id, groups in labels.items():
        label = groups[0][0]
        per_class[label] += 1
        width, height = Image.open(root / "val" / f"{image_id}.JPEG").size
        for wnid, *box in groups:
            x0, y0, x1, y1 = map(int, box)
            assert wnid == label
            assert 0 <= x0 < x1 < width and 0 <= y0 < y1 < height, (image_id, box)
    assert per_class == {w: VAL_PER_CLASS for w in counts["classes"]}
    # Classes are mixed in the val numbering, and the CSV rows are unsorted like Kaggle's.
    first = [labels[f"ILSVRC2012_val_{i:08d}"][0][0] for i in range(1, VAL_PER_CLASS + 1)]
    assert len(set(first)) > 1
    assert list(labels) != sorted(labels)


def test_synset_mapping(tree):
    root, counts = tree
    lines = (root / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == counts["classes"]
    assert lines[0] == "n01440764 tench, Tinca tinca"
    assert all(len(line.split(" ", 1)[1]) > 2 for line in lines)


def test_record_is_written_with_the_options(tree):
    root, counts = tree
    record = json.loads((root / "sample.json").read_text())
    assert record["mode"] == "tree"
    assert record["options"] == {"classes": NUM_CLASSES, "train_per_class": TRAIN_PER_CLASS,
                                 "val_per_class": VAL_PER_CLASS, "seed": 0,
                                 "generator": sample.GENERATOR_VERSION}
    assert record["counts"] == counts


def test_fewer_classes_take_the_first_wnids(tmp_path):
    counts = sample.write_sample_tree(tmp_path / "t", 3, 2, 1, progress=False)
    assert counts == {"train": 6, "val": 3, "classes": [c.wnid for c in sample.CLASSES[:3]]}
    mapping = (tmp_path / "t" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert len(mapping) == 3


# ---------------------------------------------------------------- determinism

def test_same_seed_writes_the_same_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        sample.write_sample_tree(tmp_path / name, 3, 4, 2, seed=seed, progress=False)
    first = all_files(tmp_path / "a")
    assert len(first) == 3 * 4 + 3 * 2 + 2
    assert first == all_files(tmp_path / "b")
    jpegs = {data for name, data in first.items() if name.endswith(".JPEG")}
    other_jpegs = {data for name, data in all_files(tmp_path / "c").items()
                   if name.endswith(".JPEG")}
    assert len(jpegs & other_jpegs) == 0, "another seed must draw other images"


# ---------------------------------------------------------------- image content

def test_sizes_and_aspect_ratios_vary(tree):
    root, _ = tree
    sizes = [Image.open(p).size for p in root.rglob("*.JPEG")]
    widths, heights = zip(*sizes)
    aspects = [w / h for w, h in sizes]
    assert len(set(sizes)) > 0.8 * len(sizes)
    assert min(widths) < 80 and max(widths) > 400 and min(heights) < 80 and max(heights) > 400
    assert min(aspects) < 1 / 1.8 and max(aspects) > 1.8
    assert min(aspects) >= 1 / 2.6 and max(aspects) <= 2.6
    assert any(max(s) <= 64 for s in sizes), "expected a few thumbnails"


def test_image_size_distribution():
    rng = np.random.default_rng(0)
    sizes = np.array([sample.image_size(rng) for _ in range(3000)])
    assert sizes.min() >= 32 and sizes.max() <= 500
    thumbnails = (sizes.max(axis=1) <= 64).mean()
    assert 0.02 < thumbnails < 0.07
    aspects = sizes[:, 0] / sizes[:, 1]
    assert aspects.min() >= 1 / 2.6 and aspects.max() <= 2.6
    assert 0.5 < (aspects > 1).mean() < 0.7  # more landscape than portrait, as in ImageNet


def test_images_have_structure_not_noise(tree):
    root, _ = tree
    correlations = [neighbour_correlation(grey(p)) for p in root.rglob("*.JPEG")]
    assert np.median(correlations) > 0.9
    assert min(correlations) > 0.3  # uniform noise gives ~0
    assert neighbour_correlation(np.random.default_rng(0).random((64, 64))) < 0.1


def thumbnail(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((8, 8), Image.Resampling.BOX)
    return np.asarray(img, np.float32).ravel()


def test_classes_differ_in_colour_and_are_learnable(tree):
    root, counts = tree
    centroids = np.stack([np.mean([thumbnail(p) for p in (root / "train" / w).iterdir()], axis=0)
                          for w in counts["classes"]])
    mean_colours = centroids.reshape(NUM_CLASSES, -1, 3).mean(axis=1)
    distances = np.linalg.norm(mean_colours[:, None] - mean_colours[None], axis=-1)
    assert distances[~np.eye(NUM_CLASSES, dtype=bool)].min() > 10
    # Nearest class mean of an 8x8 thumbnail: a classifier far weaker than the models
    # trained on this data must already tell the classes apart.
    labels = val_labels(root)
    correct = [counts["classes"][np.linalg.norm(centroids - thumbnail(p), axis=1).argmin()]
               == labels[p.stem][0][0] for p in (root / "val").iterdir()]
    assert np.mean(correct) >= 0.8


# ---------------------------------------------------------------- benchmark JPEGs

def test_benchmark_jpegs_are_imagenet_sized(tmp_path):
    paths = sample.write_benchmark_jpegs(tmp_path / "bench", 8, progress=False)
    assert [p.name for p in paths] == [f"bench_{i:06d}.JPEG" for i in range(8)]
    kilobytes = [p.stat().st_size / 1000 for p in paths]
    assert 80 < np.mean(kilobytes) < 150, kilobytes
    for path in paths:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (470, 400))
        assert neighbour_correlation(grey(path)) > 0.5  # detailed, yet a texture, not noise
    again = sample.write_benchmark_jpegs(tmp_path / "again", 2, progress=False)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths[:2]]


# ---------------------------------------------------------------- command line

def run_main(argv: list[str], capsys) -> str:
    assert sample.main(argv + ["--no-progress"]) == 0
    return capsys.readouterr().out


def test_cli_rerun_skips_a_complete_tree(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--output", str(out), "--classes", "2", "--train-per-class", "3",
            "--val-per-class", "2", "--seed", "1"]
    assert "wrote 6 train + 4 val images of 2 classes" in run_main(args, capsys)
    record_mtime = (out / "sample.json").stat().st_mtime_ns
    assert "already complete" in run_main(args, capsys)
    assert (out / "sample.json").stat().st_mtime_ns == record_mtime


def test_cli_refuses_other_options_unless_forced(tmp_path, capsys):
    out = tmp_path / "s"
    run_main(["--output", str(out), "--classes", "2", "--train-per-class", "2"], capsys)
    bigger = ["--output", str(out), "--classes", "3", "--train-per-class", "2"]
    with pytest.raises(PipelineError, match="--force"):
        sample.main(bigger)
    assert len(list(out.glob("train/*"))) == 2
    run_main(bigger + ["--force"], capsys)
    assert len(list(out.glob("train/*"))) == 3


def test_cli_refuses_a_foreign_directory_and_leaves_it_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="not empty"):
        sample.main(["--output", str(tmp_path), "--classes", "1"])
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_cli_deleted_file_makes_the_tree_incomplete(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--output", str(out), "--classes", "1", "--train-per-class", "2"]
    run_main(args, capsys)
    next(out.glob("train/*/*.JPEG")).unlink()
    with pytest.raises(PipelineError, match="--force"):
        sample.main(args)
    run_main(args + ["--force"], capsys)
    assert len(list(out.glob("train/*/*.JPEG"))) == 2


def test_cli_benchmark_mode(tmp_path, capsys):
    out = tmp_path / "b"
    assert "wrote 3 benchmark JPEGs" in run_main(["--output", str(out), "--benchmark-jpegs",
                                                   "3"], capsys)
    assert sorted(p.name for p in out.glob("*.JPEG")) == [f"bench_{i:06d}.JPEG" for i in range(3)]
    assert "already complete" in run_main(["--output", str(out), "--benchmark-jpegs", "3"], capsys)
    with pytest.raises(PipelineError, match="--classes only apply to the sample tree"):
        sample.main(["--output", str(tmp_path / "x"), "--benchmark-jpegs", "3", "--classes", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--classes", "11"], "--classes must be between 1 and 10"),
    (["--classes", "0"], "--classes must be between 1 and 10"),
    (["--train-per-class", "0"], "--train-per-class must be at least 1"),
    (["--val-per-class", "0"], "--val-per-class must be at least 1"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--benchmark-jpegs", "0"], "--benchmark-jpegs must be at least 1"),
])
def test_cli_rejects_bad_options(tmp_path, argv, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        sample.main(["--output", str(tmp_path / "x")] + argv)
    assert not (tmp_path / "x").exists()


def test_python_m_prints_a_clean_error():
    result = subprocess.run([sys.executable, "-m", "pipeline.sample", "--output", "unused",
                             "--classes", "99"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --classes must be between 1 and 10 (the sample "
                                     "has 10 drawn classes), got 99")


# ---------------------------------------------------------------- module names

def test_the_old_module_name_keeps_every_name_and_the_stage_runs_the_new_one():
    from pipeline import cli, sampledata
    from pipeline.bench import jpegs

    assert sample.write_sample_tree is sampledata.write_sample_tree
    assert sample.main is sampledata.main and sample.CLASSES is sampledata.CLASSES
    assert sample.write_benchmark_jpegs is jpegs.write_benchmark_jpegs
    assert sample.TextureBank is jpegs.TextureBank
    assert all(hasattr(sample, name) for name in sampledata.__all__)
    assert cli.STAGES["sample"][0] == "pipeline.sampledata"
    result = subprocess.run([sys.executable, "-m", "pipeline.sampledata", "--output", "unused",
                             "--benchmark-jpegs", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --benchmark-jpegs must be at least 1, got 0"
