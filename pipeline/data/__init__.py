"""Streaming shard loader: uint8 image batches (or the latents of `pipeline encode`) for
training (endless) and evaluation (exactly once).

    spec.py      shard specs -> ShardSet (directories, manifests, brace patterns, pipe:,
                 fsspec URLs); open_shard; ShardWarning
    decode.py    image decoders (PNG_DECODER: the fastest installed), decode_image
    epochs.py    the train stream's plan: exact-epoch shares, interleaving, shuffling
    stream.py    the per-worker streams: ShardReader, TrainStream (exact or resampled),
                 EvalStream (every sample once over all ranks and workers)
    handover.py  worker batches to the caller without a copy; ShardLoader
    latents.py   latent shards of `pipeline encode`: LatentFormat from the manifest,
                 sample_moments
    loader.py    make_train_loader, make_eval_loader, make_loader(mode=...), normalize
    cache.py     the device-resident train data (--data.cache gpu|host): plan_cache,
                 fill_cache, CachedLoader, make_cached_loader

Images stay uint8 until `normalize` runs on the device, so host-to-device copies are a
quarter of the size of float32 ones; a batch is B x 3 x H x W in channels-last memory.
The lean tar reader itself is `pipeline.shards` (prepare writes that format).
"""
from .decode import PNG_DECODER, PNG_DECODERS, decode_image, npy_array
from .epochs import (Segment, check_streams, count_samples, epoch_order, stream_segments,
                     stream_share)
from .handover import BUFFER_SLOTS, PREFETCH, ShardLoader
from .latents import (LATENT_FORMAT, LATENT_MEMBERS, LatentFormat, latent_format,
                      latent_format_of, sample_moments)
from .loader import (MODES, ON_ERROR, SAMPLING, make_eval_loader, make_loader,
                     make_train_loader, normalize)
from .spec import READ_BUFFER, ShardSet, ShardWarning, Spec, open_shard, resolve_spec
from .cache import (CachedLoader, CachePlan, ImageCache, fill_cache, make_cached_loader,
                    plan_cache)
from .stream import EvalStream, Sample, ShardReader, ShardStream, TrainStream

# Private names the tests reach: the merge they check, and the seam they replace to pin
# without CUDA (handover looks `_pin_memory` up here, as stream does `decode_image`).
from .epochs import _interleaved  # noqa: F401,E402
from .handover import _pin_memory  # noqa: F401,E402

__all__ = ["BUFFER_SLOTS", "CachePlan", "CachedLoader", "EvalStream", "ImageCache",
           "LATENT_FORMAT", "LATENT_MEMBERS", "LatentFormat",
           "MODES", "ON_ERROR", "PNG_DECODER", "PNG_DECODERS",
           "PREFETCH", "READ_BUFFER", "SAMPLING", "Sample", "Segment", "ShardLoader",
           "ShardReader", "ShardSet", "ShardStream", "ShardWarning", "Spec", "TrainStream",
           "check_streams", "count_samples", "decode_image", "epoch_order", "fill_cache",
           "make_cached_loader", "make_eval_loader", "plan_cache",
           "make_loader", "make_train_loader", "normalize", "open_shard", "resolve_spec",
           "stream_segments", "stream_share", "latent_format", "latent_format_of", "npy_array",
           "sample_moments"]
