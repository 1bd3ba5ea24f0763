"""The launch files: accelerate configs parse as Accelerate configs, `accelerate launch`
runs the trainer, and the SLURM script is valid bash that requeues on the documented code."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["accelerate_config.yaml", "launch/1gpu.yaml", "launch/8gpu.yaml",
           "launch/multinode.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_configs_load_as_accelerate_configs(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(ROOT / name)
    raw = yaml.safe_load((ROOT / name).read_text())
    assert config.num_processes == raw["num_processes"] >= 1
    assert config.mixed_precision == "no"  # the pipeline's own --mixed-precision decides


def test_slurm_script_is_valid_bash_and_requeues_on_exit_75():
    script = ROOT / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    from pipeline.train import EXIT_PREEMPTED

    assert f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in text and "scontrol requeue" in text
    assert "accelerate launch" in text and "--machine_rank" in text


def test_accelerate_launch_runs_the_trainer(tmp_path, synthetic_shards):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "launch" / "1gpu.yaml"), "--cpu", "-m", "pipeline.train",
         "--config", "debug", "--train-shards", str(synthetic_shards / "train"),
         "--val-shards", str(synthetic_shards / "val"), "--output", str(run_dir),
         "--max-steps", "3", "--tracker", "none", "--num-workers", "0"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    export = json.loads((run_dir / "model" / "config.json").read_text())
    assert export["step"] == 3
    assert (run_dir / "checkpoints" / "step-3" / "COMPLETE").exists()
