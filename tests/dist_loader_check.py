"""Run under `torchrun --nproc_per_node 2`: the loader in a real 2-rank gloo job.

Each rank takes `--steps` train batches from 2 workers (the shard set may have fewer
shards than ranks x workers), checks with an all_reduce that both ranks took the same
number, then makes one eval pass over each `--val` spec and writes what it saw (train
keys too, for exact epochs) to `OUT/rank<r>.json` for tests/test_data.py to check
exactly-once delivery.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.data import make_loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", required=True, help="train shard spec")
    parser.add_argument("--val", action="append", required=True, help="val shard spec (repeatable)")
    parser.add_argument("--out", required=True, type=Path, help="directory for rank<r>.json")
    parser.add_argument("--steps", type=int, default=50, help="train batches per rank")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--sampling", default="exact", help="train sampling (exact, resampled)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 2, f"expected 2 processes, got world size {world_size}"

    train = make_loader(args.train, 8, mode="train", num_workers=args.workers, seed=0,
                        sampling=args.sampling)
    assert (train.dataset.rank, train.dataset.world_size) == (rank, 2)
    train_keys, steps = [], 0
    for _, _, keys in itertools.islice(train, args.steps):
        train_keys += keys
        steps += 1
    counts = torch.tensor([steps])
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)  # a rank that ran dry would show here

    evals = []
    for spec in args.val:
        loader = make_loader(spec, 16, mode="eval", num_workers=args.workers)
        keys = [key for _, _, batch_keys in loader for key in batch_keys]
        evals.append({"spec": spec, "keys": keys, "num_seen": loader.num_seen,
                      "num_skipped": loader.num_skipped, "expected_total": loader.expected_total})
    dist.barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"rank": rank, "world_size": world_size, "train_steps": steps,
              "min_train_steps": int(counts.item()), "train_keys": train_keys,
              "epoch_size": train.epoch_size, "evals": evals}
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
