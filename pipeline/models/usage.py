"""Code usage and perplexity of a quantiser, per batch and over a sliding window of steps.

Per-batch perplexity is capped by the batch (a batch of 512 vectors cannot use more than
512 codes), so it is not comparable across batch sizes; the window sums the code counts
of the last `window` training steps and is the figure to compare runs by.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..utils import PipelineError

# The statistics CodeUsage returns, per batch and over the window.
USAGE_STATS = ("usage", "perplexity", "usage_window", "perplexity_window")
# Float32 elements the window may hold (512 MiB); beyond that the history is not worth it.
MAX_WINDOW_ELEMENTS = 2 ** 27


def usage_fraction(counts: Tensor) -> Tensor:
    """Fraction of the codes used at least once."""
    return (counts > 0).float().mean()


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of the code distribution: 1 if one code is used, k if k codes are
    used equally. An empty count vector gives 1 (no information) rather than NaN."""
    probs = counts.float() / counts.sum().clamp_min(1)
    return torch.special.entr(probs).sum().exp()


class CodeUsage(nn.Module):
    """A ring buffer of per-step code-count vectors."""

    def __init__(self, num_codes: int, window: int):
        super().__init__()
        if window < 1:
            raise PipelineError(f"--model.usage_window must be >= 1, got {window}")
        if window * num_codes > MAX_WINDOW_ELEMENTS:
            raise PipelineError(f"a usage window of {window} steps over {num_codes} codes needs "
                                f"{window * num_codes * 4 / 2**30:.1f} GiB; lower "
                                f"--model.usage_window or the codebook size")
        self.num_codes = num_codes
        # Not persistent: diagnostics only, and it would bloat every export.
        self.register_buffer("history", torch.zeros(window, num_codes), persistent=False)
        # A tensor, not a Python int: torch.compile would recompile for every new value.
        self.register_buffer("recorded", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def steps_recorded(self) -> int:
        """Training steps recorded so far."""
        return int(self.recorded)

    def forward(self, counts: Tensor, record: bool) -> dict[str, Tensor]:
        """Stats of this batch's `counts` and of the window (after adding them if `record`)."""
        counts = counts.detach().float()
        if record:
            slot = (self.recorded % len(self.history)).view(1)
            self.history.index_copy_(0, slot, counts.view(1, -1))
            self.recorded += 1
        window_counts = self.history.sum(0)
        return {"usage": usage_fraction(counts), "perplexity": perplexity(counts),
                "usage_window": usage_fraction(window_counts),
                "perplexity_window": perplexity(window_counts)}
