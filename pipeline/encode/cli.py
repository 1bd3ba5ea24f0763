"""`pipeline encode CKPT --shards SPEC --output DIR`: main(), on one process or under
`accelerate launch` / `torchrun`."""
from __future__ import annotations

import torch

from .config import build_parser, resolve_config
from .run import encode_split


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    from accelerate import Accelerator

    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    # Without cpu=True, Accelerate ignores torchrun's WORLD_SIZE on a machine without CUDA
    # and every process would encode every shard alone (DistributedType.NO).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    summary = encode_split(cfg, ckpt, accelerator, progress=not args.no_progress)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if summary is not None:
        print(summary.line())
    return 0
