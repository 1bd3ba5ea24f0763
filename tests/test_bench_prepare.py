"""`pipeline bench prepare`: one JSON object with the figures, on a tiny generated set."""
import json

import pytest

from pipeline.bench import prepare as bench


def test_bench_prepare_json_reports_rates_ratio_scaling_and_psnr(tmp_path, capsys):
    assert bench.main(["--num-images", "12", "--repeat", "1", "--json",
                       "--jpeg-cache", str(tmp_path / "jpegs")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 12 and result["mean_input_kb"] > 50
    for key in ("baseline_images_per_s", "job_1w_images_per_s", "job_2w_images_per_s",
                "baseline_images_per_cpu_s", "job_1w_images_per_cpu_s"):
        assert result[key] > 0
    # One round: the per-round ratios are those of its rates.
    assert result["per_core_ratio"] == pytest.approx(result["job_1w_images_per_cpu_s"]
                                                     / result["baseline_images_per_cpu_s"])
    assert result["scaling_2_vs_1"] == pytest.approx(result["job_2w_images_per_s"]
                                                     / result["job_1w_images_per_s"])
    assert len(result["rounds"]["scaling_2_vs_1"]) == 1
    assert result["psnr_min_db"] >= 35.0 and result["meets_targets"]["psnr_min_db"]


def test_bench_prepare_ratios_are_medians_of_paired_rounds(tmp_path, capsys, monkeypatch):
    """A slow phase of the machine that hits one round must not skew the ratios."""
    naive = iter([(2.0, 2.0), (4.0, 4.0), (2.2, 2.2)])  # (wall, cpu) seconds per round
    one = iter([(0, 1.0, 1.0), (0, 2.0, 2.0), (0, 1.0, 1.0)])  # (startup, wall, cpu)
    two = iter([(0, 0.55, 0.1), (0, 0.9, 0.1), (0, 0.6, 0.1)])
    monkeypatch.setattr(bench, "naive_baseline", lambda *a: next(naive))
    monkeypatch.setattr(bench, "timed_job", lambda root, out, options, workers:
                        next(one if workers == 1 else two))
    monkeypatch.setattr(bench, "psnr_figures", lambda *a: (40.0, 39.0))
    files = [tmp_path / f"{i}.JPEG" for i in range(10)]
    for f in files:
        f.write_bytes(b"x" * 1000)
    result = bench.run_bench(files, tmp_path / "work", bench.prep.Options(), repeat=3)
    assert result["rounds"]["per_core_ratio_wall"] == [2.0, 2.0, 2.2]
    assert result["per_core_ratio_wall"] == 2.0
    assert result["scaling_2_vs_1"] == pytest.approx(1.0 / 0.55)  # median of 1.82, 2.22, 1.67
    assert result["job_1w_images_per_s"] == 10.0  # rates: the best round


def test_bench_prepare_table_names_the_figures(tmp_path, capsys):
    assert bench.main(["--num-images", "4", "--repeat", "1", "--workers", "1",
                       "--jpeg-cache", str(tmp_path / "jpegs")]) == 0
    out = capsys.readouterr().out
    assert "naive baseline" in out and "per-core ratio" in out and "PSNR" in out
    assert "2 workers" not in out
