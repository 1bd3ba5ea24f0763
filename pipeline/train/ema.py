"""`WeightEMA`: an exponential moving average of the model's weights, for exports."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class WeightEMA:
    """Exponential moving average of a model's weights (buffers are copied as they are).

    Buffers are not averaged: an EMA'd VQ codebook would blend a restarted code with the
    dead one it replaced, and BatchNorm statistics belong to the weights that made them.
    Checkpoints hold `module`'s weights (the `ema` part of `checkpoint_parts`).
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.module = copy.deepcopy(model).to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, live in zip(self.module.parameters(), model.parameters()):
            ema.lerp_(live, 1 - self.decay)
        for ema, live in zip(self.module.buffers(), model.buffers()):
            ema.copy_(live)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)
