"""`pipeline encode CKPT --shards SPEC --output DIR`: a split's images -> latent shards.

One output shard per source shard (same index), `DIR/<split>/<split>-NNNNNN.tar`, each
sample `<key>.latent.npy` (AE), `<key>.moments.npy` (VAE: mean and log-variance) or
`<key>.codes.npy` (quantisers) with the source's `.cls` and a `.json` naming the source
key and shard; `manifest.json` records the latent, the checkpoint, the source and the
latent statistics (`scaling_factor`, `shift_factor`). Runs under `accelerate launch` /
`torchrun` (each shard encoded by one process), resumes shard by shard, writes every
shard atomically. `pipeline.data.make_loader` reads the result; `pipeline decode` turns
it back into images. One concern per module:

    config.py   EncodeConfig (every option, its default and range), the parser
    checkpoint.py  the checkpoint read (model, step, weights' sha256)
    source.py   reading the source shards: per shard, in batches that never cross its end
    store.py    what is stored per sample (LatentPlan, BatchEncoder), the statistics' sums
    job.py      DIR/<split>: lock, job record, shard records, resume, the manifest
    run.py      encode_split: the order of it all across processes
    cli.py      main()
"""
from .checkpoint import Checkpoint, load_checkpoint
from .cli import main
from .config import ALIASES, FLIPS, LATENT_MODES, EncodeConfig, build_parser, resolve_config
from .job import ShardRecord, source_identity
from .run import EncodeSummary, SingleProcess, encode_split, rank_shards
from .store import (FLIP_SUFFIX, BatchEncoder, LatentPlan, LatentSums, latent_statistics,
                    plan_latents, sample_seed)

__all__ = ["ALIASES", "BatchEncoder", "Checkpoint", "EncodeConfig", "EncodeSummary", "FLIPS",
           "FLIP_SUFFIX", "LATENT_MODES", "LatentPlan", "LatentSums", "SingleProcess",
           "ShardRecord", "build_parser", "encode_split", "latent_statistics", "load_checkpoint",
           "main", "plan_latents", "rank_shards", "resolve_config", "sample_seed",
           "source_identity"]
