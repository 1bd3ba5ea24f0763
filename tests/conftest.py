import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from shardgen import make_split  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """train: 600 samples in 5 shards; val: 150 samples in 3 shards (PNG, 10 classes)."""
    root = tmp_path_factory.mktemp("synthetic_shards")
    make_split(root, "train", 600, 120)
    make_split(root, "val", 150, 50)
    return root


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """The embedded sample tree (10 classes, 300 train + 100 val JPEGs) through `prepare`."""
    from pipeline.prepare import main as prepare_main
    from pipeline.sample import write_sample_tree

    root = tmp_path_factory.mktemp("sample_tree")
    write_sample_tree(root / "tree", progress=False)
    out = root / "shards"
    assert prepare_main(["--input", str(root / "tree"), "--output", str(out), "--workers", "1",
                         "--shard-size", "100", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    """Randomly initialised AlexNet features and LPIPS linear layers, in the formats
    `--loss.lpips_backbone` / `--loss.lpips_linear` accept (nothing is downloaded)."""
    import torch

    from pipeline.models.lpips import LPIPS_NETS, write_random_backbone

    root = tmp_path_factory.mktemp("lpips_standins")
    torch.manual_seed(0)
    backbone = write_random_backbone(root / "alexnet.pth", "alex", seed=0)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
              for i, c in enumerate(LPIPS_NETS["alex"][1])}
    torch.save(linear, root / "alex.pth")
    return backbone, root / "alex.pth"
