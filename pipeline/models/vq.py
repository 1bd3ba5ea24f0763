"""Vector quantiser (van den Oord et al. 2017) with EMA codebook and dead-code restarts.

Design choices, each for a failure seen in practice:
- Distances, EMA statistics and the commitment loss are computed in float32 with autocast
  off: in bf16, codes closer than ~1% of their norm are indistinguishable.
- The codebook starts from random encoder outputs of the first training batch (uniform
  random codes far from the data would mostly never be picked).
- Codes whose EMA cluster size is below `dead_code_threshold` when a training forward
  starts are restarted at its end, after the lookup and the statistics update, from
  random encoder outputs of its batch (distinct vectors while the batch has enough), for
  the next batches to use. Restarting before the lookup, as this module did first, let
  the batch pick exact copies of its own vectors: with fewer batch vectors per code than
  the threshold (K = 1024, 512 vectors a step) nearly every code restarted every step and
  training ran almost unquantised, its codebook a copy of the last batch. The restart is
  a masked update of every code (no count of dead codes is read back to Python), so the
  forward has no data-dependent control flow and compiles without graph breaks; nothing
  outside the forward needs calling.
- Under torch.distributed every rank must keep the same codebook: counts and sums are
  all-reduced before the EMA update, and restart candidates (min(K, batch vectors) rows)
  are drawn on rank 0 and broadcast at every training forward. Collectives run only in
  training mode, so every rank must run the same number of training-mode forwards with
  batches of the same size (as DDP training does anyway).
- `rotation_trick=True` (Fifty et al. 2024) replaces the straight-through estimator: the
  decoder's gradient reaches the encoder rotated and scaled as x is onto its code
  (`quantization.rotate_onto`). Outputs, gradients, commitment loss and EMA steps equal
  vector-quantize-pytorch's `VectorQuantize` (kmeans off, same decay; tested), whose
  default differs: rotation on, no dead-code restart, uniform random initial codes.
  In loss mode (`ema=False`) the two VQ-VAE terms are kept apart (`commitment` with
  --loss.commitment_weight, `codebook` with --loss.codebook_weight) where its learnable
  codebook has one symmetric term.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import ModelConfig
from .bottleneck import BottleneckOutput, Quantizer
from .quantization import code_counts, nearest_code, pass_gradient
from .registry import register_quantizer
from .usage import CodeUsage


class VectorQuantizer(Quantizer):
    quantizer_name = "vq"

    def __init__(self, codebook_size: int, code_dim: int, *, ema: bool = True,
                 decay: float = 0.99, l2_normalize: bool = False,
                 dead_code_threshold: float = 1.0, usage_window: int = 100,
                 eps: float = 1e-5, rotation_trick: bool = False):
        super().__init__()
        self.codebook_size = self.num_codes = codebook_size
        self.in_channels = self.latent_channels = code_dim
        self.bits_per_position = math.log2(codebook_size)
        self.ema = ema
        self.decay = decay
        self.l2_normalize = l2_normalize
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps  # Laplace smoothing of the cluster sizes: no division by zero
        self.rotation_trick = rotation_trick

        codes = self._normalize(torch.randn(codebook_size, code_dim))
        if ema:
            self.register_buffer("codebook", codes)
            self.register_buffer("embed_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        # EMA of how many vectors each code received; starts at one (the code itself) so
        # that codebook == embed_sum / cluster_size holds from the start. Kept in loss mode
        # too, where it only decides which codes are dead.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(False))
        self.usage = CodeUsage(codebook_size, usage_window)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VectorQuantizer":
        return cls(cfg.codebook_size, cfg.code_dim, ema=cfg.codebook_ema, decay=cfg.codebook_decay,
                   l2_normalize=cfg.l2_normalize_codes,
                   dead_code_threshold=cfg.dead_code_threshold, usage_window=cfg.usage_window,
                   rotation_trick=cfg.rotation_trick)

    # ------------------------------------------------------------ forward

    def forward(self, z: Tensor) -> BottleneckOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices, terms, counts = self.quantize_vectors(flat.float())
        z_q = rearrange(quantized, "(b h w) d -> b d h w", b=batch, h=height, w=width)
        stats = {"indices": indices.view(batch, height, width),
                 **self.usage(counts, record=self.training)}
        return BottleneckOutput(z_q.to(z.dtype), terms, stats)

    def quantize_vectors(self, x: Tensor, active: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """Rows x (N×D float32) -> (their codes with the gradient to x, indices (N,), raw
        loss terms, code counts (K,)). In training mode the first batch initialises the
        codebook before its lookup; after every lookup the statistics are updated and the
        codes that were dead when the call began restart from x.

        `active` (a bool scalar tensor, for residual stages) set False makes this call
        leave the codebook and its statistics as they are: the caller discards the
        result, without a Python branch on the flag.
        """
        x = self._normalize(x)
        if self.training:
            candidates = self._restart_candidates(x.detach())
            dead = self._dead_codes(active)  # before the initialisation resets the sizes
            self._initialize(candidates, active)
        # A copy: the restart below rewrites the codebook in place, and the normalisation
        # of a codebook learnt by the loss keeps its input for the backward pass.
        codes = self._normalize(self.codebook.float().clone())
        indices = nearest_code(x.detach(), codes.detach())
        quantized = F.embedding(indices, codes)
        terms = {"commitment": F.mse_loss(x, quantized.detach())}
        if not self.ema:
            terms["codebook"] = F.mse_loss(quantized, x.detach())
        counts = code_counts(indices, self.codebook_size)
        if self.training:
            self._update_statistics(x.detach(), indices, counts.clone(), active)
            self._restart(candidates, dead)
        return pass_gradient(x, quantized, self.rotation_trick), indices, terms, counts

    def codes(self) -> Tensor:
        """The codebook as used for lookup (float32, unit rows when l2-normalised)."""
        return self._normalize(self.codebook.float())

    def latent_from_codes(self, codes: Tensor) -> Tensor:
        """B×h×w indices -> their code vectors B×D×h×w, as `forward` hands them on."""
        return rearrange(F.embedding(codes, self.codes()), "b h w d -> b d h w")

    def nearest(self, x: Tensor, codes: Tensor) -> Tensor:
        """Index of the closest code (squared Euclidean) for every row of x, in float32."""
        return nearest_code(x, codes)

    def _normalize(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalize else x

    def diffusers_codebook(self) -> Tensor | None:
        """K×D float32 codes for diffusers' plain Euclidean lookup (the export); None with
        l2-normalised codes, which it cannot express (it would not normalise the inputs)."""
        return None if self.l2_normalize else self.codes().detach().float().cpu().clone()

    # ------------------------------------------------------------ codebook learning

    @torch.no_grad()
    def _update_statistics(self, x: Tensor, indices: Tensor, counts: Tensor,
                           active: Tensor | None = None) -> None:
        """EMA of cluster sizes (both modes) and, in EMA mode, of the codes themselves."""
        _all_reduce_sum(counts)
        # lerp_(new, 1 - decay) == old * decay + new * (1 - decay); an inactive call
        # lerps by 0, which leaves every statistic exactly as it was.
        rate = 1 - self.decay if active is None else (1 - self.decay) * active.float()
        self.cluster_size.lerp_(counts, rate)
        if not self.ema:
            return
        sums = x.new_zeros(self.codebook_size, x.shape[1]).index_add_(0, indices, x)
        _all_reduce_sum(sums)
        self.embed_sum.lerp_(sums, rate)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebook = self._normalize(self.embed_sum / smoothed.unsqueeze(1))
        self.codebook.copy_(codebook if active is None else
                            torch.where(active, codebook, self.codebook))

    @torch.no_grad()
    def _restart_candidates(self, x: Tensor) -> Tensor:
        """min(K, N) distinct random rows of x, the same on every rank (rank 0's)."""
        rows = torch.randperm(len(x), device=x.device)[:min(self.codebook_size, len(x))]
        candidates = x[rows].contiguous()
        _broadcast_from_rank0(candidates)
        return candidates

    def _dead_codes(self, active: Tensor | None) -> Tensor:
        """Codes to restart after this lookup (identical on every rank: cluster sizes are
        synchronised); none before the codebook is initialised."""
        dead = (self.cluster_size < self.dead_code_threshold) & self.initialized
        return dead if active is None else dead & active

    @torch.no_grad()
    def _initialize(self, candidates: Tensor, active: Tensor | None) -> None:
        """Every code from the candidates, on the first training batch only (masked)."""
        first = ~self.initialized if active is None else ~self.initialized & active
        self._restart(candidates, first.expand(self.codebook_size))
        self.initialized.copy_(self.initialized | (True if active is None else active))

    @torch.no_grad()
    def _restart(self, candidates: Tensor, chosen: Tensor) -> None:
        """Replace the `chosen` codes by candidates: the j-th chosen code gets the j-th
        candidate (cycling when there are more chosen codes than candidates), as a masked
        update of the whole codebook and its statistics."""
        rank_among_chosen = (chosen.long().cumsum(0) - 1).clamp_min(0) % len(candidates)
        replacements = candidates[rank_among_chosen]
        # A restarted code counts as `reset` vectors: alive until it goes unused for a while.
        reset = max(self.dead_code_threshold, 1.0)
        rows = chosen.unsqueeze(1)
        self.codebook.copy_(torch.where(rows, replacements.to(self.codebook.dtype),
                                        self.codebook))
        self.cluster_size.copy_(torch.where(chosen, reset, self.cluster_size))
        if self.ema:
            self.embed_sum.copy_(torch.where(rows, replacements * reset, self.embed_sum))


@register_quantizer("vq")
def build_vector_quantizer(cfg: ModelConfig) -> VectorQuantizer:
    return VectorQuantizer.from_config(cfg)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: Tensor) -> None:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _broadcast_from_rank0(tensor: Tensor) -> None:
    if _distributed():
        dist.broadcast(tensor, src=0)
