"""`pipeline bench gpu` on CPU (`--device cpu --tiny`): one JSON object on stdout, the same
in `--output`, saved after every model, one model's failure confined to its row, nothing
downloaded, and bad options refused with exit 2 naming them."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import cli
from pipeline.bench import gpu

TRAINING = ("synthetic_images_per_s", "streaming_images_per_s", "cache_images_per_s",
            "compiled_images_per_s")
RATIOS = ("streaming_ratio", "cache_ratio", "compile_speedup")


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def saves(monkeypatch):
    """The model rows of the report at every write of --output."""
    written = []
    real_save = gpu.save

    def recording_save(report, output, began):
        written.append([dict(row) for row in report["models"]])
        real_save(report, output, began)

    monkeypatch.setattr(gpu, "save", recording_save)
    return written


def bench(*argv: str) -> int:
    return cli.main(["bench", "gpu", "--device", "cpu", "--tiny", *argv])


def is_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_tiny_run_prints_one_json_object_and_writes_the_same(tmp_path, capsys, no_downloads,
                                                            saves):
    """The seed AE and the adversarial recipe (LPIPS stand-in, discriminator)."""
    output = tmp_path / "bench-gpu.json"
    assert bench("--models", "ae,vqgan", "--json", "--output", str(output)) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("\n") == 1  # one line: the object, nothing else
    report = json.loads(stdout)
    assert json.loads(output.read_text()) == report
    assert [row["model"] for row in report["models"]] == ["ae", "vqgan"]
    for row in report["models"]:
        assert [key for key in row if key.endswith("error")] == [], row
        assert all(is_positive(row[key]) for key in (*TRAINING, *RATIOS, "parameters",
                                                      "eval_images_per_s")), row
        assert row["compile_s"] >= 0 and row["cache_fill_s"] >= 0
        assert 0 <= row["streaming_data_wait_frac"] <= 1 and 0 <= row["cache_data_wait_frac"] <= 1
        assert row["streaming_workers"] == 1 and row["cache"] == "host"
        assert row["peak_mem_gb"] is None  # no GPU memory on CPU
        assert row["streaming_ratio"] == pytest.approx(
            row["streaming_images_per_s"] / row["synthetic_images_per_s"], abs=1e-3)
    settings, loader = report["settings"], report["loader"]
    assert settings["device"] == "cpu" and settings["tiny"] is True
    assert settings["batch_size"] == gpu.TINY.batch_size and settings["workers"] == 1
    assert is_positive(loader["samples_per_s"]) and loader["workers"] == 1
    assert set(report["meets_targets"]) == {"ae_cache_images_per_s", "cache_ratio",
                                            "streaming_ratio"}
    # Saved once the loader was measured, after each model's eager and compiled runs,
    # and at the end: a run cut short leaves every model it finished.
    assert [len(rows) for rows in saves] == [0, 1, 2, 2, 2, 2]
    assert "compiled_images_per_s" not in saves[2][0] and "compiled_images_per_s" in saves[3][0]


def test_a_failing_model_is_its_rows_error_and_the_others_stand(tmp_path, capsys, monkeypatch,
                                                                 saves):
    real_measure = gpu.measure_eager

    def failing_for_the_vae(cfg, device, sizes):
        if cfg.model.model == "vae":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_measure(cfg, device, sizes)

    monkeypatch.setattr(gpu, "measure_eager", failing_for_the_vae)
    output = tmp_path / "out.json"
    assert bench("--models", "vae,ae", "--no-compile", "--output", str(output)) == 0
    table = capsys.readouterr().out
    rows = {row["model"]: row for row in json.loads(output.read_text())["models"]}
    assert rows["vae"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "error" not in rows["ae"] and is_positive(rows["ae"]["cache_images_per_s"])
    assert saves[1][0]["error"] and len(saves[1]) == 1  # saved before the next model ran
    assert "vae" in table and "failed: RuntimeError" in table


def test_a_failing_part_is_its_own_error(tmp_path, monkeypatch):
    """A cache that does not fit (or a loader that breaks) leaves the other figures."""
    def no_room(run, sizes):
        raise gpu.PipelineError("--data.cache host: ... use --data.cache none")

    monkeypatch.setattr(gpu, "measure_cache", no_room)
    output = tmp_path / "out.json"
    assert bench("--models", "ae", "--no-compile", "--output", str(output)) == 0
    (row,) = json.loads(output.read_text())["models"]
    assert row["cache_error"].startswith("PipelineError: --data.cache host")
    assert row["cache_ratio"] is None and "error" not in row
    assert is_positive(row["streaming_images_per_s"]) and is_positive(row["eval_images_per_s"])


def test_the_lpips_stand_in_is_written_under_the_runs_directory(tmp_path, no_downloads):
    vqgan = next(model for model in gpu.MODELS if model.name == "vqgan")
    cfg = gpu.bench_config(vqgan, gpu.FULL, torch.device("cpu"), False, "shards", 0, tmp_path)
    assert cfg.loss.perceptual_weight > 0
    assert cfg.loss.lpips_backbone == str(tmp_path / f"{cfg.loss.lpips_net}-stand-in.pth")
    assert (tmp_path / f"{cfg.loss.lpips_net}-stand-in.pth").is_file()
    assert cfg.train.output.startswith(str(tmp_path))


@pytest.mark.parametrize("argv,message", [
    (["--models", "ae,nope"], "error: --models: unknown nope"),
    (["--models", ","], "error: --models: unknown (empty)"),
    (["--workers", "-1"], "error: --workers must be >= 0"),
    (["--batch-size", "0"], "error: --batch-size and --samples must be >= 1"),
    (["--output", "/nonexistent-dir/bench.json"], "error: --output /nonexistent-dir/bench.json"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    assert bench(*argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_naming_the_option(capsys):
    assert cli.main(["bench", "gpu", "--device", "cuda", "--json"]) == 2
    assert "error: --device cuda: no CUDA device is visible" in capsys.readouterr().err


def test_an_unknown_device_exits_2_naming_the_option(capsys):
    assert cli.main(["bench", "gpu", "--device", "tpu"]) == 2
    assert "error: --device tpu" in capsys.readouterr().err
