"""The trainer end to end on CPU: convergence, run directory, W&B offline, checkpoints,
exact resume, non-finite losses, preemption, bad configs, two processes.

Runs use the `debug` preset (tiny widths) on the synthetic shards, one thread each.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import is_tensorboard_available
from safetensors.torch import load_file

from pipeline import train
from pipeline.train import loop as train_loop  # where the loop looks its helpers up
from pipeline.bench import train as bench_train
from pipeline.checkpoint import COMPLETE_MARKER, latest_checkpoint, resolve_resume
from pipeline.config import OptimConfig, list_presets
from pipeline.models import build_model, from_pretrained
from pipeline.tracking import read_history
from pipeline.utils import PipelineError
from wandb_offline import offline_runs

REPO = Path(__file__).resolve().parents[1]
CONVERGENCE_STEPS = {"ae": 60, "vae": 80, "vqvae": 120}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The machine's cores are shared: every run (and child process) uses one thread."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def args_for(shards: Path, output: Path, model: str, steps: int, *extra: str) -> list[str]:
    return ["--config", "debug", "--model", model, "--train-shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--output", str(output),
            "--max-steps", str(steps), *extra]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def trained(sample_shards, tmp_path_factory):
    """One short run per model on the embedded sample data; the VAE logs to W&B offline,
    the AE keeps 2 of 3 checkpoints."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tmp_path_factory.mktemp("runs")
    extra = {"ae": ["--ckpt-every", "20", "--keep-last", "2", "--val-every", "1000"],
             "vae": ["--tracker", "wandb", "--run-name", "vae-test", "--group", "tests",
                     "--tags", "ci,cpu", "--val-every", "40"],
             "vqvae": ["--val-every", "1000"]}
    runs = {}
    for model, steps in CONVERGENCE_STEPS.items():
        runs[model] = root / model
        assert train.main(args_for(sample_shards, runs[model], model, steps,
                                   *extra[model])) == 0
    return runs


# ---------------------------------------------------------------- convergence ("must show")

@pytest.mark.parametrize("model", list(CONVERGENCE_STEPS))
def test_short_run_beats_mean_image_and_halves_error(trained, model):
    history = read_history(trained[model])
    first_val = history[0]
    assert first_val["step"] == 0 and "val/recon" in first_val  # untrained baseline
    first_train = next(h["train/recon"] for h in history if "train/recon" in h)
    final = history[-1]
    assert final["step"] == CONVERGENCE_STEPS[model]
    print(f"{model}: val/recon {first_val['val/recon']:.4f} -> {final['val/recon']:.4f}, "
          f"first train/recon {first_train:.4f}, mean image {final['val/mean_image_recon']:.4f}")
    assert final["val/recon"] < final["val/mean_image_recon"]
    assert final["val/recon"] <= 0.5 * first_val["val/recon"]
    assert final["val/recon"] <= 0.5 * first_train


# ---------------------------------------------------------------- run directory

def test_history_and_config_yaml(trained):
    history = read_history(trained["vqvae"])
    steps = [h["step"] for h in history]
    assert steps == [0, 1, *range(10, 121, 10)]
    last = history[-1]
    for key in ("train/loss", "train/recon", "train/commitment", "train/lr", "train/grad_norm",
                "train/global_batch", "perf/images_per_s", "perf/data_wait_frac",
                "vq/usage", "vq/perplexity", "vq/usage_window", "vq/perplexity_window",
                "val/loss", "val/recon", "val/mse", "val/psnr", "val/mean_image_recon"):
        assert key in last and math.isfinite(last[key]), key
    assert last["train/global_batch"] == 16
    assert 0 <= last["perf/data_wait_frac"] <= 1 and last["perf/images_per_s"] > 0
    assert 0 < last["vq/usage"] <= 1
    vae = read_history(trained["vae"])[-1]
    assert {"train/kl", "train/kl_weighted", "train/beta"} <= set(vae)

    record = yaml.safe_load((trained["vqvae"] / "config.yaml").read_text())
    assert record["model"]["model"] == "vqvae" and record["model"]["widths"] == [16, 32, 64]
    assert record["train"]["max_steps"] == 120 and record["train"]["seed"] == 0
    assert record["run"]["world_size"] == 1 and record["run"]["global_batch"] == 16
    assert record["run"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "git_commit" in record["run"]


def test_run_config_yaml_is_a_valid_config(trained, synthetic_shards, tmp_path):
    """`--config RUN_DIR/config.yaml` reproduces a run's settings (provenance is ignored)."""
    args = train.build_parser().parse_args(["--config", str(trained["vae"] / "config.yaml"),
                                            "--output", str(tmp_path / "again")])
    cfg = train.resolve_config(args)
    assert cfg.model.model == "vae" and cfg.train.max_steps == 80
    assert cfg.tracker.tags == ["ci", "cpu"]


def test_checkpoints_pruned_and_exported(trained):
    run = trained["ae"]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-40", "step-60"]
    last = checkpoints / "step-60"
    assert {p.name for p in last.iterdir()} == {COMPLETE_MARKER, "config.json",
                                                "model.safetensors", "state", "trainer.json"}
    assert {p.name for p in (last / "state").iterdir()} == {
        "model.safetensors", "optimizer.safetensors", "optimizer.json", "accelerator.json",
        "rng-0.safetensors", "rng-0.json"}  # no pickle: safetensors and JSON only
    trainer = json.loads((last / "trainer.json").read_text())
    assert trainer["step"] == 60 and trainer["batches_consumed"] == 60
    exported = json.loads((run / "model" / "config.json").read_text())
    assert exported["step"] == 60 and exported["weights"] == "raw"
    assert exported["model"]["model"] == "ae" and exported["run_dir"] == str(run)
    model = from_pretrained(run / "model")
    assert not model.training
    assert torch.equal(load_file(run / "model" / "model.safetensors")["encoder.0.weight"],
                       load_file(last / "model.safetensors")["encoder.0.weight"])
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).recon.shape == (2, 3, 64, 64)
    assert from_pretrained(checkpoints / "step-40") is not None  # any step evaluates alone


def test_wandb_offline_run_matches_history(trained):
    run_dir = trained["vae"]
    runs = offline_runs(run_dir)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert logged.config["model.model"] == "vae" and logged.config["train.max_steps"] == 80
    assert logged.config["run.world_size"] == 1
    assert (logged.name, logged.group, logged.tags) == ("vae-test", "tests", ["ci", "cpu"])
    history = read_history(run_dir)
    for row in history:
        for key in ("train/loss", "train/recon", "train/kl", "train/lr", "val/recon"):
            if key in row:
                assert logged.history[row["step"]][key] == pytest.approx(row[key], rel=1e-6)
    assert "images/reconstructions/path" in logged.history[80]
    assert "images/prior_samples/path" in logged.history[80]
    names = [p.name for p in logged.images()]
    assert any(n.startswith("reconstructions") for n in names)
    assert any(n.startswith("prior_samples") for n in names)
    assert {p.name for p in (run_dir / "samples").iterdir()} >= {
        "step-50.png", "step-50-prior_samples.png", "step-80.png"}


# ---------------------------------------------------------------- resume

def test_resume_from_checkpoint_is_exact(synthetic_shards, tmp_path):
    """Resuming from step 4 of a run reproduces its steps 5..10 bit for bit (VQ-VAE with
    weight EMA, gradient accumulation, 2 loader workers and random flips: codebook EMA,
    dead-code restarts drawing from the RNG, loader position)."""
    extra = ["--ema", "true", "--grad-accum", "2", "--num-workers", "2", "--data.flip", "true",
             "--ckpt-every", "4", "--log-every", "1", "--keep-last", "5"]
    whole = tmp_path / "whole"
    assert train.main(args_for(synthetic_shards, whole, "vqvae", 10, *extra)) == 0

    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    # Leftovers of a crash: a temporary save and a checkpoint without its marker.
    (resumed / "checkpoints" / ".step-6.tmp" / "state").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-8", resumed / "checkpoints" / "step-7")
    (resumed / "checkpoints" / "step-7" / COMPLETE_MARKER).unlink()
    assert latest_checkpoint(resumed).name == "step-4"

    assert train.main(args_for(synthetic_shards, resumed, "vqvae", 10, *extra,
                               "--resume", "auto")) == 0
    assert not (resumed / "checkpoints" / ".step-6.tmp").exists()
    a = load_file(whole / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert json.loads((resumed / "model" / "config.json").read_text())["weights"] == "ema"
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert json.loads((resumed / "checkpoints" / "step-10" / "trainer.json").read_text())[
        "batches_consumed"] == 20
    losses = {h["step"]: h["train/loss"] for h in read_history(whole) if "train/loss" in h}
    again = {h["step"]: h["train/loss"] for h in read_history(resumed) if "train/loss" in h}
    assert sorted(again) == list(range(5, 11))
    assert all(again[s] == losses[s] for s in again)


def test_resume_with_other_model_is_refused(trained, synthetic_shards):
    run = trained["ae"]
    args = args_for(synthetic_shards, run, "ae", 80, "--resume", "auto",
                    "--model.widths", "16,32,32", "--model.latent_channels", "32")
    with pytest.raises(PipelineError, match=r"cannot resume .*model\.widths: checkpoint "
                                            r"\[16, 32, 64\], this run \[16, 32, 32\]"):
        train.main(args)
    with pytest.raises(PipelineError, match="already holds checkpoints.*--resume auto"):
        train.main(args_for(synthetic_shards, run, "ae", 80))
    with pytest.raises(PipelineError, match=r"holds newer checkpoints \(step-60\)"):
        train.main(args_for(synthetic_shards, run, "ae", 80, "--resume",
                            str(run / "checkpoints" / "step-40")))
    assert latest_checkpoint(run).name == "step-60"  # nothing was touched


def test_resume_path_must_be_complete(tmp_path):
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    with pytest.raises(PipelineError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step-3"), tmp_path)
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start


# ---------------------------------------------------------------- non-finite losses

def poison(monkeypatch, steps: set[int]) -> None:
    """Make the training KL term NaN at the given steps (validation stays finite)."""
    real = train_loop.compute_loss

    def compute_loss(out, x, loss_cfg, step):
        loss, parts = real(out, x, loss_cfg, step)
        if step in steps and torch.is_grad_enabled():
            parts = {**parts, "kl": parts["kl"] * float("nan")}
            loss = loss + parts["kl"]
        return loss, parts

    monkeypatch.setattr(train_loop, "compute_loss", compute_loss)


def test_nonfinite_loss_stops_naming_step_and_term(monkeypatch, synthetic_shards, tmp_path):
    poison(monkeypatch, {3})
    with pytest.raises(PipelineError, match=r"non-finite loss at step 3: term 'kl' = nan"):
        train.main(args_for(synthetic_shards, tmp_path / "run", "vae", 6))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nonfinite_loss_skipped_and_counted(monkeypatch, synthetic_shards, tmp_path):
    poison(monkeypatch, {3, 5})
    run = tmp_path / "run"
    assert train.main(args_for(synthetic_shards, run, "vae", 6, "--train.nan_policy", "skip",
                               "--log-every", "1")) == 0
    history = {h["step"]: h for h in read_history(run)}
    assert history[6]["train/nonfinite_skipped"] == 2
    assert "train/grad_norm" not in history[3] and "train/grad_norm" in history[4]
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# ---------------------------------------------------------------- preemption

def test_sigterm_checkpoints_exits_75_and_resumes_same_wandb_run(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.train",
               *args_for(synthetic_shards, run, "ae", 5000, "--tracker", "wandb")]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "history.jsonl").is_file() or len(read_history(run)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == train.EXIT_PREEMPTED, output
    stopped = json.loads((run / train.PREEMPTED_NAME).read_text())
    assert stopped["signal"] == "SIGTERM" and f"exit {train.EXIT_PREEMPTED}" in output
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name == f"step-{stopped['step']}"

    final = stopped["step"] + 3
    assert train.main(args_for(synthetic_shards, run, "ae", final, "--tracker", "wandb",
                               "--resume", "auto", "--log-every", "1")) == 0
    assert not (run / train.PREEMPTED_NAME).exists()
    steps = [h["step"] for h in read_history(run)]
    assert steps[-3:] == list(range(stopped["step"] + 1, final + 1))
    assert len(steps) == len(set(steps))
    first, second = offline_runs(run)
    assert first.run_id == second.run_id
    assert min(s for s in second.history if s > 0) == stopped["step"] + 1


def test_stop_flag_agreed_at_next_step(synthetic_shards, tmp_path, monkeypatch):
    """A signal raised inside a step stops the run at that step (in-process, SIGUSR1)."""
    real = train_loop.forward_backward

    def forward_backward(run, batches, window, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(run, batches, window, step)

    monkeypatch.setattr(train_loop, "forward_backward", forward_backward)
    run = tmp_path / "run"
    assert train.main(args_for(synthetic_shards, run, "ae", 50)) == train.EXIT_PREEMPTED
    assert latest_checkpoint(run).name == "step-2"
    assert json.loads((run / train.PREEMPTED_NAME).read_text())["signal"] == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


# ---------------------------------------------------------------- bad configs

@pytest.mark.parametrize("override, message", [
    (["--model", "foo"], r"unknown --model 'foo'; choose one of ae, vae, vqvae"),
    (["--model.widths", "8,16,32,64,128,256,512"], r"latent side would be 0\.5"),
    (["--train-shards", "/nonexistent/train"], r"train shards not found: /nonexistent/train.*"
                                                r"pipeline prepare"),
    (["--val-shards", ""], r"--val-shards is required"),
    (["--tracker", "mlflow"], r"unknown --tracker 'mlflow'; choose one of wandb, tensorboard, "
                              r"none"),
])
def test_bad_config_fails_before_training(synthetic_shards, tmp_path, override, message):
    run = tmp_path / "run"
    with pytest.raises(PipelineError, match=message):
        train.main(args_for(synthetic_shards, run, "ae", 5) + override)
    assert not run.exists()  # nothing started


@pytest.mark.skipif(is_tensorboard_available(), reason="tensorboard is installed here")
def test_missing_tracker_package_fails_before_training(synthetic_shards, tmp_path):
    with pytest.raises(PipelineError, match="--tracker tensorboard needs the `tensorboard`"):
        train.main(args_for(synthetic_shards, tmp_path / "run", "ae", 5,
                            "--tracker", "tensorboard"))
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_config_in_one_line(synthetic_shards, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train",
         *args_for(synthetic_shards, tmp_path / "run", "foo", 5)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown --model 'foo'")
    assert "Traceback" not in result.stderr


def test_help_lists_aliases_and_fields():
    text = train.build_parser().format_help()
    for option in ("--config", "--model", "--arch", "--train-shards", "--resume", "--tracker",
                   "--wandb-project", "--optim.ema_decay", "--train.nan_policy"):
        assert option in text
    assert str(train.EXIT_PREEMPTED) in text


# ---------------------------------------------------------------- schedule, precision, bench

def test_lr_warmup_then_cosine_to_floor():
    optim = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert train.get_lr(1, optim, 110) == pytest.approx(0.1)
    assert train.get_lr(10, optim, 110) == pytest.approx(1.0)
    assert train.get_lr(60, optim, 110) == pytest.approx(0.55)
    assert train.get_lr(110, optim, 110) == pytest.approx(0.1)


def test_bf16_channels_last_short_run(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    assert train.main(args_for(synthetic_shards, run, "vae", 3, "--mixed-precision", "bf16",
                               "--train.channels_last", "true")) == 0
    assert math.isfinite(read_history(run)[-1]["train/loss"])


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_validates_and_builds(preset):
    args = train.build_parser().parse_args(["--config", preset])
    cfg = train.resolve_config(args)
    assert build_model(cfg.model).latent_shape[1] == cfg.model.latent_side


def test_default_preset_follows_model_and_arch():
    parse = train.build_parser().parse_args
    assert train.resolve_config(parse(["--model", "vae"])).model.latent_channels == 64
    cfg = train.resolve_config(parse(["--model", "vqvae", "--arch", "resnet"]))
    assert cfg.model.code_dim == 8 and cfg.model.arch == "resnet"


@pytest.mark.slow
def test_torch_compile_run_exports_plain_weights(synthetic_shards, tmp_path):
    """torch.compile on CPU compiles for a minute or more; the loop is otherwise the same."""
    run = tmp_path / "run"
    assert train.main(args_for(synthetic_shards, run, "vqvae", 3, "--compile", "true",
                               "--ema", "true")) == 0
    assert not any(k.startswith("_orig_mod") for k in load_file(run / "model" /
                                                               "model.safetensors"))
    assert from_pretrained(run / "model") is not None


def test_bench_train_json(capsys):
    assert bench_train.main(["--preset", "debug", "--models", "ae,vqvae", "--archs", "basic",
                             "--steps", "2", "--warmup", "1", "--batch-size", "4",
                             "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in report["results"]] == ["ae", "vqvae"]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["settings"]["device"] in ("cpu", "cuda")


# ---------------------------------------------------------------- distributed

def torchrun_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port + os.getpid() % 1000), "-m", "pipeline.train", *args]


DDP_OPTIONS = ("--log-every", "2", "--ema", "true", "--ckpt-every", "2", "--keep-last", "5")


@pytest.fixture(scope="module")
def two_process_run(synthetic_shards, tmp_path_factory):
    """A VQ-VAE with weight EMA trained for 4 steps by 2 processes (checkpoints 2 and 4)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    command = torchrun_command(29500, *args_for(synthetic_shards, run, "vqvae", 4, *DDP_OPTIONS))
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_two_processes_with_torchrun(two_process_run):
    """DDP over gloo: both ranks train, agree, checkpoint, and the global batch doubles."""
    run = two_process_run
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["run"]["world_size"] == 2 and record["run"]["global_batch"] == 32
    history = read_history(run)
    assert [h["step"] for h in history] == [0, 1, 2, 4]  # one writer: no duplicated lines
    assert history[-1]["train/global_batch"] == 32
    state = run / "checkpoints" / "step-4" / "state"
    assert {"rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"} <= {
        p.name for p in state.iterdir()}
    assert (run / "checkpoints" / "step-4" / COMPLETE_MARKER).is_file()


def test_resume_under_torchrun_is_exact(two_process_run, synthetic_shards, tmp_path):
    """2 processes resumed from step 2 reproduce steps 3 and 4 bit for bit: each rank's
    RNG state, the loader position, the EMA, the codebook."""
    resumed = tmp_path / "resumed"
    shutil.copytree(two_process_run / "checkpoints" / "step-2",
                    resumed / "checkpoints" / "step-2")
    command = torchrun_command(33500, *args_for(synthetic_shards, resumed, "vqvae", 4,
                                                *DDP_OPTIONS, "--resume", "auto"))
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(two_process_run / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    whole, again = read_history(two_process_run)[-1], read_history(resumed)[-1]
    assert again["step"] == 4 and again["train/loss"] == whole["train/loss"]
    assert again["train/epoch"] == whole["train/epoch"] == 4 * 16 * 2 / 600


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc), e.g. the workers torchrun started."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_signal_to_one_rank_stops_both_at_the_same_step(synthetic_shards, tmp_path):
    """SLURM's signals reach ranks at different moments; here only one rank gets SIGUSR1.
    Both agree on the step, write one complete checkpoint (both ranks' RNG state) and exit
    75; torchrun reports the failure, the marker file tells the SLURM script to requeue."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(30500 + os.getpid() % 1000), "-m", "pipeline.train",
               *args_for(synthetic_shards, run, "ae", 5000, "--log-every", "1")]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "history.jsonl").is_file() or len(read_history(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        workers = child_pids(proc.pid)
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGUSR1)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun turns a worker's 75 into its own failure
    assert output.count(f"exitcode  : {train.EXIT_PREEMPTED}") >= 1, output[-3000:]
    stopped = json.loads((run / train.PREEMPTED_NAME).read_text())
    checkpoint = latest_checkpoint(run)
    assert checkpoint.name == f"step-{stopped['step']}"
    assert {"rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"} <= {
        p.name for p in (checkpoint / "state").iterdir()}
    assert read_history(run)[-1]["step"] == stopped["step"]


def test_weight_ema_averages_parameters_and_copies_buffers():
    import torch
    from torch import nn

    from pipeline.train import WeightEMA

    live = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(live, decay=0.9, device=torch.device("cpu"))
    before = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(5.0)
    ema.update(live)
    assert torch.allclose(ema.module[0].weight, before + 0.1)  # 0.9 * old + 0.1 * new
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 5.0))  # copied, not averaged
