"""`pipeline bench prepare`: one JSON object with the figures, on a tiny generated set."""
import json

from pipeline.bench import prepare as bench


def test_bench_prepare_json_reports_rates_ratio_scaling_and_psnr(tmp_path, capsys):
    assert bench.main(["--num-images", "12", "--repeat", "1", "--json",
                       "--jpeg-cache", str(tmp_path / "jpegs")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 12 and result["mean_input_kb"] > 50
    for key in ("baseline_images_per_s", "job_1w_images_per_s", "job_2w_images_per_s",
                "baseline_images_per_cpu_s", "job_1w_images_per_cpu_s"):
        assert result[key] > 0
    assert result["per_core_ratio"] == (result["job_1w_images_per_cpu_s"]
                                        / result["baseline_images_per_cpu_s"])
    assert result["scaling_2_vs_1"] == (result["job_2w_images_per_s"]
                                        / result["job_1w_images_per_s"])
    assert result["psnr_min_db"] >= 35.0 and result["meets_targets"]["psnr_min_db"]


def test_bench_prepare_table_names_the_figures(tmp_path, capsys):
    assert bench.main(["--num-images", "4", "--repeat", "1", "--workers", "1",
                       "--jpeg-cache", str(tmp_path / "jpegs")]) == 0
    out = capsys.readouterr().out
    assert "naive baseline" in out and "per-core ratio" in out and "PSNR" in out
    assert "2 workers" not in out
