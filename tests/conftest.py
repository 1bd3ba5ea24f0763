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
