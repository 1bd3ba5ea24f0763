"""The README's first command, shortened: the whole chain end to end, then a re-run."""
import json
import subprocess
import sys


def run_demo(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--output", str(out), "--steps", "40",
         "--sample-classes", "4", "--batch-size", "16", *extra],
        capture_output=True, text=True, timeout=600)


def test_demo_runs_the_chain_and_a_rerun_skips_completed_stages(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = out / "report" / "report.html"
    assert first.stdout.strip().splitlines()[-1] == f"report: {report.resolve()}"
    for stage in ("1/5 sample", "2/5 prepare", "3/5 train ae", "3/5 train vae",
                  "3/5 train vqvae", "4/5 evaluate", "5/5 report"):
        assert stage in first.stdout
    names = sorted(p.parent.name for p in (out / "eval").glob("*/metrics.json"))
    assert names == ["ae-basic-step40", "vae-basic-step40", "vqvae-basic-step40"]
    for name in names:
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["num_samples"] == metrics["expected_samples"] > 0
        assert name in report.read_text()
    metrics_mtime = (out / "eval" / "ae-basic-step40" / "metrics.json").stat().st_mtime_ns

    second = run_demo(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("already holds step 40; skipping") == 3
    assert "every checkpoint already has its metrics.json; skipping" in second.stdout
    assert (out / "eval" / "ae-basic-step40" / "metrics.json").stat().st_mtime_ns == metrics_mtime
