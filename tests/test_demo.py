"""The README's first command, shortened: the whole chain end to end (with the hand-off:
latents of the val split and a diffusers export), then a re-run."""
import json
import subprocess
import sys

from pipeline.report.handoff import LOADING_EXAMPLE

RUNS = ["ae-basic", "vae-basic", "vqvae-basic", "vae-resnet-f4"]


def run_demo(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--output", str(out), "--steps", "40",
         "--sample-classes", "4", "--batch-size", "16", *extra],
        capture_output=True, text=True, timeout=600)


def loading_example_result(export, latents) -> dict:
    """The report's loading example, run on the demo's own hand-off outputs."""
    code = LOADING_EXAMPLE.format(export=export, latents=latents) + (
        "import json\nprint(json.dumps({'z': list(z.shape), 'images': list(images.shape), "
        "'finite': bool(torch.isfinite(images).all())}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_demo_runs_the_chain_and_a_rerun_skips_completed_stages(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = out / "report" / "report.html"
    lines = first.stdout.strip().splitlines()
    assert lines[-3:] == [f"latents: {(out / 'latents' / 'val').resolve()}",
                          f"diffusers export: {(out / 'export' / 'vae-resnet-f4').resolve()}",
                          f"report: {report.resolve()}"]
    for stage in ("1/7 sample", "2/7 prepare", "3/7 train ae", "3/7 train vae",
                  "3/7 train vqvae", "3/7 train the hand-off VAE", "4/7 evaluate",
                  "5/7 encode", "6/7 export", "7/7 report"):
        assert stage in first.stdout
    names = sorted(p.parent.name for p in (out / "eval").glob("*/metrics.json"))
    assert names == sorted(f"{run}-step40" for run in RUNS)
    for name in names:
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["num_samples"] == metrics["expected_samples"] > 0
        assert name in report.read_text()

    # The hand-off: every val sample's moments once, an export scaled by them, both in the
    # report, and the report's loading example works on them.
    source = json.loads((out / "shards" / "val" / "manifest.json").read_text())
    latents = json.loads((out / "latents" / "val" / "manifest.json").read_text())
    assert latents["latent"]["kind"] == "moments"
    assert latents["num_samples"] == source["num_samples"] - source.get("num_skipped", 0)
    record = json.loads((out / "export" / "vae-resnet-f4" / "export.json").read_text())
    assert record["class"] == "AutoencoderKL"
    assert record["scaling_factor"] == latents["scaling_factor"] > 0
    page = report.read_text()
    assert "Hand-off" in page and str(out / "latents" / "val") in page
    assert str(out / "export" / "vae-resnet-f4") in page
    result = loading_example_result(out / "export" / "vae-resnet-f4", out / "latents" / "val")
    assert result == {"z": [64, 4, 16, 16], "images": [64, 3, 64, 64], "finite": True}
    metrics_mtime = (out / "eval" / "ae-basic-step40" / "metrics.json").stat().st_mtime_ns
    export_mtime = (out / "export" / "vae-resnet-f4" / "export.json").stat().st_mtime_ns

    second = run_demo(out)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("already holds step 40; skipping") == len(RUNS)
    assert "every checkpoint already has its metrics.json; skipping" in second.stdout
    assert "already holds these weights; skipping" in second.stdout
    assert (out / "eval" / "ae-basic-step40" / "metrics.json").stat().st_mtime_ns == metrics_mtime
    assert (out / "export" / "vae-resnet-f4" / "export.json").stat().st_mtime_ns == export_mtime
