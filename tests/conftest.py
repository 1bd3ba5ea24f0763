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
