"""Operations the codebook quantisers share (`vq`, `simvq`, `rvq`): the nearest-code lookup,
code counts, and how the gradient passes the non-differentiable lookup.

Everything here has static shapes and no Python value taken from a tensor, so a quantiser
built from these ops compiles (torch.compile) without graph breaks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of the distance matrix computed at once: keeps it near 256 MiB for big codebooks.
DISTANCE_CHUNK_ELEMENTS = 2 ** 26
# Norms below this count as zero when normalising (the oracle's value, so results agree).
NORM_EPS = 1e-6


def nearest_code(x: Tensor, codes: Tensor) -> Tensor:
    """Index of the closest code (squared Euclidean) for every row of x, in float32."""
    rows = max(1, DISTANCE_CHUNK_ELEMENTS // len(codes))
    codes = codes.float()
    code_norms = codes.pow(2).sum(1)
    chunks = []
    for chunk in x.float().split(rows):
        distances = chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ codes.t() + code_norms
        chunks.append(distances.argmin(1))
    return torch.cat(chunks)


def code_counts(indices: Tensor, num_codes: int) -> Tensor:
    """How often each code occurs in `indices` (float32, length num_codes). A scatter rather
    than `torch.bincount`, whose output length depends on the data (a graph break)."""
    flat = indices.flatten()
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(num_codes, device=flat.device).scatter_add_(0, flat, ones)


def pass_gradient(x: Tensor, quantized: Tensor, rotation_trick: bool) -> Tensor:
    """What the decoder gets for input rows x and their codes: the codes' values, with a
    gradient to x by the straight-through estimator or the rotation trick.

    Without a gradient to pass (evaluation, no_grad) the codes themselves are returned,
    exactly, so that decoding stored code indices reproduces the model's reconstruction.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return quantized
    if rotation_trick:
        return rotate_onto(x, quantized)
    return x + (quantized - x).detach()


def rotate_onto(x: Tensor, quantized: Tensor) -> Tensor:
    """The rotation trick (Fifty et al. 2024, "Restructuring vector quantization with the
    rotation trick", sec. 4.2): x mapped onto its code by the rotation R that turns x's
    direction into the code's and the rescaling |q|/|x|, both treated as constants.

    The value is the code (up to rounding); the gradient to x is R^T (|q|/|x|) times the
    decoder's, so it keeps the angle between the gradient and x instead of copying it as
    the straight-through estimator does. R = I - 2 w w^T + 2 q̂ x̂^T with w = (x̂ + q̂)/|x̂ + q̂|
    applied as x - 2 (x·w) w + 2 (x·x̂) q̂ (no d×d matrix). The code gets no gradient from
    this path (as in the paper and vector-quantize-pytorch's `rotate_to`, which this equals).
    """
    x_norm = x.norm(dim=-1, keepdim=True)
    q_norm = quantized.norm(dim=-1, keepdim=True)
    x_dir = (x / x_norm.clamp_min(NORM_EPS)).detach()
    q_dir = (quantized / q_norm.clamp_min(NORM_EPS)).detach()
    w = F.normalize(x_dir + q_dir, dim=-1, eps=NORM_EPS)
    rotated = (x - 2 * (x * w).sum(-1, keepdim=True) * w
               + 2 * (x * x_dir).sum(-1, keepdim=True) * q_dir)
    return rotated * (q_norm / x_norm.clamp_min(NORM_EPS)).detach()


def commitment_terms(x: Tensor, quantized: Tensor) -> dict[str, Tensor]:
    """VQ-VAE's two terms for codes learnt by the loss: `commitment` pulls x towards its
    code (weighted by --loss.commitment_weight), `codebook` the code towards x
    (--loss.codebook_weight)."""
    return {"commitment": F.mse_loss(x, quantized.detach()),
            "codebook": F.mse_loss(quantized, x.detach())}
