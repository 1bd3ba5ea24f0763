"""pipeline report: contents equal the metrics files, self-contained HTML, escaping, bad input,
W&B offline logging, and the page rendering in headless Chromium."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipeline import layout, report
from pipeline.cli import main as cli_main
from pipeline.utils import PipelineError
from reportgen import make_comparison, write_checkpoint, write_history

# Per column: decimals shown, so a cell equals the metrics file to within half a unit.
SHOWN_DECIMALS = {"psnr": 2, "psnr_of_mean_mse": 2, "ssim": 4, "ms_ssim": 4, "mse": 5, "l1": 4,
                  "lpips": 4, "rfid": 2, "bits_per_image": 1, "latent_size": 0,
                  "codebook_usage": 1, "perplexity": 1, "images_per_s": 0}
NAMES = ["ae-step100", "ae-step200", "vae-step200", "vq-step200"]
# originals + (reconstruction, error map) x 4 + VAE prior + VQ code usage + 2 plots
EXPECTED_IMAGES = 1 + 2 * 4 + 1 + 1 + 2


class HTMLTables(HTMLParser):
    """Cells of every <table> as (text, css classes), and every <img>'s attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, str]]]] = []
        self.images: list[dict[str, str]] = []
        self._cell: list[str] | None = None
        self._classes = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._classes = [], attrs.get("class") or ""
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(("".join(self._cell).strip(), self._classes))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_html(path: Path) -> HTMLTables:
    parser = HTMLTables()
    parser.feed(path.read_text())
    return parser


def markdown_metrics_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the metrics table: the first table under `## Metrics`."""
    section = markdown.split("## Metrics\n\n", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("|"))
    lines = table.splitlines()
    split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[2:]]


def assert_row_matches(cells: list[str], header: list[str], metrics: dict) -> None:
    by_key = dict(zip([c.key for c in report.COLUMNS], cells[len(report.IDENTITY_HEADER):]))
    assert len(header) == len(report.IDENTITY_HEADER) + len(report.COLUMNS)
    model = metrics["model"] + (f" ({metrics['quantizer']})" if metrics.get("quantizer") else "")
    assert cells[1:4] == [model, metrics["arch"], str(metrics["step"])]
    assert cells[4] == str(metrics["num_samples"])
    for key, cell in by_key.items():
        cell = cell.strip("*")
        if metrics[key] is None:
            assert cell == "—", key
        else:
            assert float(cell) == pytest.approx(metrics[key], abs=0.51 * 10 ** -SHOWN_DECIMALS[key])


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Four fabricated checkpoints of three runs and the report built from them."""
    root = tmp_path_factory.mktemp("report")
    data = make_comparison(root)
    out = root / "out"
    assert report.main([str(data["eval"]), "--output", str(out), "--title", "Test report"]) == 0
    data["out"] = out
    data["metrics"] = {p.parent.name: json.loads(p.read_text()) for p in data["metrics"]}
    data["html"] = (out / "report.html").read_text()
    data["md"] = (out / "report.md").read_text()
    return data


def test_markdown_table_equals_metrics_files(comparison):
    header, rows = markdown_metrics_rows(comparison["md"])
    assert [row[0] for row in rows] == NAMES
    for row in rows:
        assert_row_matches(row, header, comparison["metrics"][row[0]])
    best = {report.COLUMNS[j - 5].key for j, cell in enumerate(rows[1]) if cell.startswith("**")}
    assert {"psnr", "ssim", "mse", "l1"} <= best  # ae-step200 is the sharpest
    assert "bits_per_image" not in best and "latent_size" not in best  # rates are not ranked
    usage = header.index("code usage % ↑")
    assert rows[3][usage] == "82.0"  # the only checkpoint with code usage: not marked best


def test_html_table_equals_metrics_files_and_marks_best(comparison):
    tables = parse_html(comparison["out"] / "report.html").tables
    header = [text for text, _ in tables[0][0]]
    assert header[:5] == report.IDENTITY_HEADER
    rows = tables[0][1:]
    assert [row[0][0] for row in rows] == NAMES
    for row in rows:
        assert_row_matches([text for text, _ in row], header, comparison["metrics"][row[0][0]])
    psnr_col = 5
    assert [("best" in classes) for _, classes in (row[psnr_col] for row in rows)] == \
        [False, True, False, False]
    lowest_mse = min(rows, key=lambda row: float(row[psnr_col + 4][0]))
    assert "best" in lowest_mse[psnr_col + 4][1] and lowest_mse[0][0] == "ae-step200"


def test_report_sections(comparison):
    md, out = comparison["md"], comparison["out"]
    for title in ("Metrics", "Rate–distortion", "Training curves", "Reconstructions",
                  "Prior samples and code usage", "Per-class PSNR", "Worst images"):
        assert f"## {title}\n" in md and f">{title}</h2>" in comparison["html"]
    # The vae run has no history.jsonl: the report says so instead of failing.
    assert "vae: no curve (training log not found" in md
    assert md.count(": no curve") == 1  # ae and vq have logs
    # Fixed keys listed once, since all checkpoints reconstructed the same images.
    assert md.count("Images, left to right: val_000000, val_000001") == 1
    # VAE prior samples and VQ code usage, only for the checkpoints they apply to.
    assert "![prior_samples of vae-step200](assets/c02-prior_samples.png)" in md
    assert "![code usage of vq-step200](assets/c03-code-usage.png)" in md
    assert "prior_samples of ae" not in md and "code usage of ae" not in md
    # Worst keys of each checkpoint, and per-class PSNR of every class.
    assert "val_000000 (18.12 dB)" in md
    per_class = md.split("## Per-class PSNR\n", 1)[1].split("##", 1)[0]
    assert per_class.count("| n000000") == 10
    # Every image the Markdown points to was written, and nothing else.
    referenced = set(re.findall(r"\]\(assets/([^)]+)\)", md))
    assert referenced == {p.name for p in (out / "assets").iterdir()}
    assert len(referenced) == EXPECTED_IMAGES


def test_html_is_self_contained_and_every_image_decodes(comparison):
    html_text = comparison["html"]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html_text)
    images = parse_html(comparison["out"] / "report.html").images
    assert len(images) == EXPECTED_IMAGES
    for img in images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(img["src"][len(prefix):]))) as im:
            im.load()
            assert im.format == "PNG" and im.width > 0
    # Strips are embedded byte for byte, shown at 2x (1024 px -> 2048 px) without smoothing.
    strip = (comparison["eval"] / "ae-step100" / "originals.png").read_bytes()
    assert base64.b64encode(strip).decode() in html_text
    assert 'class="strip"' in html_text and 'width="2048"' in html_text


def test_names_and_paths_are_escaped(tmp_path):
    evil = '<script>alert(1)</script>&"x" | y'
    write_checkpoint(tmp_path / "eval", evil, folder="evil", run=evil,
                     run_dir=tmp_path / "runs/<b>", step=5,
                     fixed_keys=['<img src=x onerror="1">'] * 16)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "eval"), "--output", str(out), "--title", "<i>T</i>"]) == 0
    html_text = (out / "report.html").read_text()
    for raw in (evil, "<script>", "runs/<b>", '<img src=x onerror', "<i>T</i>"):
        assert raw not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;x&quot; | y" in html_text
    assert "runs/&lt;b&gt;" in html_text and "&lt;i&gt;T&lt;/i&gt;" in html_text
    md = (out / "report.md").read_text()
    assert "\\<script\\>alert(1)\\</script\\>\\&\"x\" \\| y" in md  # `|` cannot split a cell
    assert "<script>" not in md


def test_identical_names_are_disambiguated(tmp_path):
    for folder in ("a", "b"):
        write_checkpoint(tmp_path / folder, "same", run="same", run_dir=None, step=1,
                         psnr=20.0 + len(folder))
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)]) == 0
    rows = parse_html(out / "report.html").tables[0][1:]
    assert [row[0][0] for row in rows] == ["same (a/same)", "same (b/same)"]
    md = (out / "report.md").read_text()
    for label in ("same (a/same)", "same (b/same)"):  # the two runs are told apart too
        assert f"{label}: no curve (run_dir not recorded in metrics.json)" in md


def test_same_file_given_twice_is_one_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "eval", "one", run="one", run_dir=None, step=1)
    assert report.find_metrics_files([str(tmp_path / "eval"), str(path)]) == [
        tmp_path / "eval" / "one" / "metrics.json"]


def test_missing_optional_files_say_not_available(tmp_path):
    path = write_checkpoint(tmp_path / "eval", "bare", run="bare", run_dir=tmp_path / "none",
                            step=3, latent_size=None, bits_per_image=None, per_class_psnr=None,
                            worst=[])
    (path.parent / "error_maps.png").unlink()
    out = tmp_path / "out"
    assert report.main([str(path), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Not available: no checkpoint reports bits_per_image or latent_size." in md
    assert "Not available: no run has a training log (history.jsonl)." in md
    assert "not available (error_maps not found)" in md
    assert "Not available: no checkpoint has prior samples (VAE only)." in md
    assert "Not available: no checkpoint has code usage (VQ/FSQ only)." in md
    assert md.count("Not available.") == 2  # per-class PSNR and worst images
    assert len(parse_html(out / "report.html").images) == 2  # originals + reconstructions


def test_partial_history_line_is_skipped_and_reported(tmp_path):
    history = write_history(tmp_path / "run", 100, 25.0)
    with open(history, "a") as f:
        f.write('{"step": 110, "train/lo')  # a live run mid-write
    write_checkpoint(tmp_path / "eval", "live", run="live", run_dir=tmp_path / "run", step=100)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "eval"), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "![training curves](assets/training-curves.png)" in md
    assert "live: 1 unreadable line(s)" in md


def test_relative_run_dir_is_found_through_the_checkpoint_path(tmp_path):
    run_dir = tmp_path / "work" / "runs" / "ae"
    write_history(run_dir, 50, 24.0)
    path = write_checkpoint(tmp_path / "eval", "ae", run="ae", run_dir="runs/ae", step=50,
                            checkpoint=str(run_dir / "checkpoints" / "step-50"))
    out = tmp_path / "out"
    assert report.main([str(path), "--output", str(out)]) == 0  # cwd is not tmp_path/work
    md = (out / "report.md").read_text()
    assert "![training curves](assets/training-curves.png)" in md and "no curve" not in md


def test_many_classes_show_the_hardest_and_easiest(tmp_path):
    per_class = {f"n{i:08d}": 20.0 + i for i in range(25)}
    path = write_checkpoint(tmp_path / "eval", "a", run="a", run_dir=None, step=1,
                            per_class_psnr=per_class)
    out = tmp_path / "out"
    assert report.main([str(path), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "The 10 hardest and 10 easiest of 25 classes" in md
    shown = re.findall(r"^\| (n\d{8}) \| ([\d.]+) \|$", md, flags=re.M)
    assert shown == [(f"n{i:08d}", f"{20 + i:.2f}") for i in [*range(10), *range(15, 25)]]


def test_comparability_warnings(tmp_path):
    write_checkpoint(tmp_path / "eval", "a", run="a", run_dir=None, step=1)
    write_checkpoint(tmp_path / "eval", "b", run="b", run_dir=None, step=1, manifest_hash="other",
                     num_samples=150, num_skipped=10)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "eval"), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "evaluated on different val sets" in md
    assert "b: 10 unreadable sample(s) skipped." in md
    assert "b: evaluated 150 of 160 samples." in md


def test_rerun_replaces_assets(comparison, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(comparison["eval"]), "--output", str(out)]) == 0
    assert report.main([str(comparison["eval"] / "ae-step100"), "--output", str(out)]) == 0
    assert {p.name for p in (out / "assets").iterdir()} == {
        "c00-originals.png", "c00-reconstructions.png", "c00-error_maps.png",
        "rate-distortion.png", "training-curves.png"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"name": "x", "model": "ae"}', "missing required key(s) step, psnr, files"),
    ('{"name": "x", "model": "ae", "step": 1, "psnr": "high", "files": {}}',
     "psnr must be a number or null"),
    ('{"name": "x", "model": "ae", "step": 1, "psnr": 1, "files": {"originals": "../a.png"}}',
     "files.originals must be a file name beside metrics.json"),
    ('{"name": "x", "model": "ae", "step": 1, "psnr": 1, "files": {}, "worst": {}}',
     "worst must be a JSON list or null"),
    ('{"name": "x", "model": "ae", "step": "1/..", "psnr": 1, "files": {}}',
     "step must be a finite number, got '1/..'"),
    ('{"name": "x", "model": "ae", "step": NaN, "psnr": 1, "files": {}}',
     "step must be a finite number, got nan"),
])
def test_bad_metrics_file_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad" / "metrics.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(PipelineError, match=re.escape(message)) as info:
        report.main([str(tmp_path), "--output", str(tmp_path / "out")])
    assert str(path) in str(info.value)
    assert not (tmp_path / "out" / "report.html").exists()


def test_bad_image_and_code_usage_name_the_file(tmp_path):
    path = write_checkpoint(tmp_path / "eval", "vq", run="vq", run_dir=None, step=1, model="vqvae")
    (path.parent / "code_usage.json").write_text('{"counts": [1, -2]}')
    with pytest.raises(PipelineError, match="code_usage.json: 'counts' must be a list"):
        report.main([str(path), "--output", str(tmp_path / "out")])
    (path.parent / "reconstructions.png").write_bytes(b"\xff\xd8 not a png")
    with pytest.raises(PipelineError, match="reconstructions.png: not a readable PNG"):
        report.main([str(path), "--output", str(tmp_path / "out")])


def test_cli_errors_print_one_line(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    expected = f"error: {tmp_path / 'nowhere'}: no such file or directory"
    assert capsys.readouterr().err.strip() == expected
    assert cli_main(["report", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no metrics.json under this directory" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        report.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("METRICS_OR_DIR", "--output", "--title", "--tracker", "--project"):
        assert option in text


def test_prints_report_path_last(comparison, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(comparison["eval"] / "vq-step200"), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.html")


def test_best_rows_and_unique_labels():
    assert report.best_rows([1.0, 3.0, 3.0, None], "higher", "{:.1f}") == {1, 2}
    assert report.best_rows([1.0, 3.0, None], "lower", "{:.1f}") == {0}
    assert report.best_rows([8.941, 8.939, 7.0], "higher", "{:.2f}") == {0, 1}  # as shown
    assert report.best_rows([None, 2.0], "higher", "{:.1f}") == set()  # one value: no ranking
    assert report.best_rows([2.0, 2.0], "higher", "{:.1f}") == set()  # all equal: no best
    assert report.best_rows([1.0, 2.0], None, "{:.1f}") == set()  # rates are not ranked
    paths = [Path("/e/x/m/metrics.json"), Path("/e/y/m/metrics.json"), Path("/e/z/metrics.json")]
    assert report.unique_labels(["m", "m", "z"], paths) == ["m (x/m)", "m (y/m)", "z"]


NON_FINITE = st.sampled_from([float("inf"), float("-inf"), float("nan")])


@given(st.lists(st.none() | st.floats(-1e6, 1e6), max_size=8),
       st.lists(st.tuples(st.integers(0, 8), NON_FINITE), max_size=4),
       st.sampled_from(["higher", "lower"]), st.sampled_from(["{:.2f}", "{:.4f}", "{:.0f}"]))
def test_non_finite_values_are_never_ranked(finite, inserts, better, fmt):
    """Inserting Infinity/NaN rows anywhere changes nothing about which of the other rows
    are best, and never makes a non-finite row best."""
    values, origin = list(finite), list(range(len(finite)))  # origin: index in `finite`
    for position, value in inserts:
        position = min(position, len(values))
        values.insert(position, value)
        origin.insert(position, None)
    best = report.best_rows(values, better, fmt)
    assert all(origin[i] is not None for i in best)
    assert sorted(origin[i] for i in best) == sorted(report.best_rows(finite, better, fmt))


def test_infinity_and_nan_in_metrics_json_are_shown_not_best(tmp_path):
    """json.loads accepts Infinity and NaN: a crafted (or broken) metrics.json may hold them."""
    write_checkpoint(tmp_path / "eval", "real", run="real", run_dir=None, step=1, psnr=24.0,
                     ssim=0.71, mse=0.004)
    write_checkpoint(tmp_path / "eval", "inf", run="inf", run_dir=None, step=1, psnr=20.0,
                     ssim=float("nan"), mse=float("-inf"), bits_per_image=float("inf"),
                     latent_size=None)
    write_checkpoint(tmp_path / "eval", "zzz", run="zzz", run_dir=None, step=1,
                     psnr=float("inf"), ssim=0.65, mse=0.006)
    assert "Infinity" in (tmp_path / "eval" / "zzz" / "metrics.json").read_text()
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "eval"), "--output", str(out)]) == 0
    header, rows = markdown_metrics_rows((out / "report.md").read_text())
    by_name = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_name["real"]["PSNR dB ↑"] == "**24.00**"  # not the infinite one
    assert by_name["zzz"]["PSNR dB ↑"] == "inf"
    assert by_name["real"]["SSIM ↑"] == "**0.7100**" and by_name["inf"]["SSIM ↑"] == "nan"
    assert by_name["real"]["MSE ↓"] == "**0.00400**" and by_name["inf"]["MSE ↓"] == "-inf"
    tables = parse_html(out / "report.html").tables
    bold = [text for row in tables[0][1:] for text, classes in row if "best" in classes]
    assert not [text for text in bold if text in ("inf", "-inf", "nan")]
    assert "never ranked" in (out / "report.md").read_text()


def test_ssim_convention_is_stated_and_mixed_conventions_are_not_ranked(tmp_path):
    write_checkpoint(tmp_path / "eval", "new", run="new", run_dir=None, step=1, ssim=0.80,
                     psnr=26.0)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "eval"), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "SSIM and MS-SSIM: skimage's convention" in md
    assert "independent of the installed library versions" in md

    # An evaluation from before the convention was recorded (torchmetrics' values).
    old = write_checkpoint(tmp_path / "eval", "old", run="old", run_dir=None, step=1, ssim=0.90,
                           psnr=27.0)
    metrics = json.loads(old.read_text())
    del metrics["settings"]["ssim_convention"]
    old.write_text(json.dumps(metrics))
    assert report.main([str(tmp_path / "eval"), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert ("SSIM and MS-SSIM were computed under different conventions, so they are not "
            "ranked: new: skimage's convention") in md
    assert "old: convention not recorded" in md
    header, rows = markdown_metrics_rows(md)
    for key in ("SSIM ↑", "MS-SSIM ↑"):
        assert not [row for row in rows if row[header.index(key)].startswith("**")], key
    psnr = header.index("PSNR dB ↑")
    assert [row[psnr] for row in rows] == ["26.00", "**27.00**"]  # other columns still ranked


def test_wandb_offline_logs_table_and_artifact(comparison, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))  # keep the home directory clean
    out = tmp_path / "out"
    assert report.main([str(comparison["eval"]), "--output", str(out), "--tracker", "wandb"]) == 0
    import wandb

    # What process exit does: wandb-core may still be writing the run file after finish().
    wandb.teardown()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (table_file,) = run_dir.glob("files/media/table/report/metrics_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[0] for row in table["data"]] == NAMES
    psnr = table["columns"].index("psnr")
    assert [row[psnr] for row in table["data"]] == [comparison["metrics"][n]["psnr"] for n in NAMES]
    run_file = next(run_dir.glob("run-*.wandb")).read_bytes()
    for logged in (b"report.html", b"report.md", b"assets/rate-distortion.png"):
        assert logged in run_file  # the artifact's manifest, recorded in the offline run


# ---------------------------------------------------------------- structure: one reader, files only

# A history.jsonl line and what the trainer's reader must make of it: a record (its step),
# an unreadable line (None), or nothing at all (a blank line, "skip").
HISTORY_LINES = st.one_of(
    st.integers(0, 10**9).map(lambda s: (json.dumps({"step": s, "train/loss": 0.5}), s)),
    st.floats(allow_nan=False, allow_infinity=False).map(
        lambda s: (json.dumps({"step": s, "train/loss": 0.5}), None)),  # 3.0 is no step either
    st.integers(max_value=-1).map(lambda s: (json.dumps({"step": s}), None)),
    st.sampled_from([('{"step": true}', None), ('{"step": "7"}', None), ('{"loss": 1}', None),
                     ("[1, 2]", None), ('{"step": 110, "train/lo', None), ("", "skip"),
                     ("   ", "skip")]),
)


@given(st.lists(HISTORY_LINES, max_size=30))
def test_history_lines_are_read_as_the_trainer_reads_them(lines):
    """The report reads a run's log with `pipeline.layout.read_history`, the trainer's reader:
    a record needs an integer step >= 0 (the report accepted any finite number before), and
    every other non-blank line is counted as unreadable."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        (run_dir / layout.HISTORY_NAME).write_text("\n".join(text for text, _ in lines) + "\n")
        checkpoint = report.Checkpoint(Path(tmp) / "eval" / "metrics.json",
                                       {"name": "x", "run_dir": str(run_dir)}, 0)
        (run,) = report.group_runs([checkpoint])
    expected_steps = [step for _, step in lines if isinstance(step, int)]
    assert Counter(r["step"] for r in run.history) == Counter(expected_steps)
    assert run.bad_lines == sum(1 for _, step in lines if step is None)


FORBIDDEN_IN_REPORT = ("torch", "torchvision", "accelerate", "webdataset", "safetensors",
                       "pipeline.models", "pipeline.data", "pipeline.train",
                       "pipeline.evaluate", "pipeline.checkpoint", "pipeline.metrics",
                       "pipeline.prepare", "pipeline.config")


def test_python_m_pipeline_report_reads_files_only(comparison, tmp_path):
    """`python -m pipeline.report` works, and a whole report imports no torch, model, data,
    trainer or evaluator code: it can be built where none of them is installed."""
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = ['pipeline.report', {str(comparison['eval'])!r}, '--output', "
        f"{str(tmp_path / 'out')!r}]\n"
        "try:\n"
        "    runpy.run_module('pipeline.report', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        f"forbidden = {FORBIDDEN_IN_REPORT!r}\n"
        "loaded = sorted(m for m in sys.modules if m in forbidden or m.startswith("
        "tuple(f + '.' for f in forbidden)))\n"
        "print(json.dumps({'code': code, 'loaded': loaded}))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"code": 0, "loaded": []}
    assert lines[-2] == str(tmp_path / "out" / "report.html")
    assert (tmp_path / "out" / "report.md").is_file()
    assert report.COLUMNS is layout.METRIC_COLUMNS  # one table of metric columns


# ---------------------------------------------------------------- headless browser

def find_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if not (chromium and driver):
        if os.environ.get("REQUIRE_BROWSER"):  # set by .ci/run, which installs both
            pytest.fail("REQUIRE_BROWSER is set but chromium/chromedriver were not found")
        pytest.skip("headless Chromium/chromedriver not installed "
                    "(CI installs Debian's chromium and chromium-driver)")
    return chromium, driver


@pytest.mark.browser
def test_report_renders_in_headless_chromium(comparison, tmp_path):
    chromium, driver_path = find_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # explicit paths: selenium-manager must not download
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1500,1200",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get((comparison["out"] / "report.html").resolve().as_uri())
        decoded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);")
        assert len(decoded) == EXPECTED_IMAGES and all(decoded)
        assert driver.title == "Test report"
        screenshot = tmp_path / "report.png"
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1500, min(height + 100, 8000))
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    with Image.open(screenshot) as im:
        assert im.width >= 1000 and im.height >= 1000
    if os.environ.get("REPORT_SCREENSHOT_DIR"):
        target = Path(os.environ["REPORT_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / "report.png")
