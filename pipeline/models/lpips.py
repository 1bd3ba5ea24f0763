"""The one LPIPS loader: `pipeline evaluate`'s LPIPS metric and the training's perceptual
term build the same network from the same local files.

LPIPS v0.1 (Zhang et al. 2018) is a torchvision ImageNet backbone (AlexNet or VGG16,
`features.*` only) plus five 1×1 "linear" layers. Both come from files the user names:

- the backbone: torchvision's state dict (`alexnet-owt-7be5be79.pth`,
  `vgg16-397923af.pth`); only `features.*` is read;
- the linear layers: the `lpips` package's `weights/v0.1/<net>.pth` (keys
  `lin0.model.1.weight` ... `lin4.model.1.weight`); unset, the copy torchmetrics ships
  inside its wheel.

Nothing here downloads and nothing unpickles (`torch.load(weights_only=True)`). Errors
name the option that gave the file: each caller passes its own spelling (`EVALUATE_OPTIONS`
for `pipeline evaluate`, `TRAIN_OPTIONS` for `pipeline train`). The network comes back
frozen and in eval mode (its linear layers hold dropout, which must stay off).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..utils import PipelineError

# Backbones: torchvision constructor and the channel count of each compared layer.
LPIPS_NETS = {"alex": ("alexnet", (64, 192, 384, 256, 256)),
              "vgg": ("vgg16", (64, 128, 256, 512, 512))}


class LpipsOptions(NamedTuple):
    """How a stage's messages name the three LPIPS settings."""
    backbone: str
    linear: str
    net: str


EVALUATE_OPTIONS = LpipsOptions("--lpips-backbone", "--lpips-linear", "--lpips-net")
TRAIN_OPTIONS = LpipsOptions("--loss.lpips_backbone", "--loss.lpips_linear", "--loss.lpips_net")


def load_lpips_network(backbone_path: str | Path, linear_path: str | Path | None,
                       net: str = "alex",
                       options: LpipsOptions = EVALUATE_OPTIONS) -> nn.Module:
    """torchmetrics' LPIPS network (`forward(a, b, normalize=False)`: [-1, 1] inputs,
    B×1×1×1 distances) with every weight read from the given local files, frozen, eval."""
    # torchmetrics' public LPIPS metric always fetches the ImageNet backbone; its network
    # class (private API, so the tests exercise it) is the same LPIPS without that download.
    from torchmetrics.functional.image.lpips import _LPIPS

    if net not in LPIPS_NETS:
        raise PipelineError(f"{options.net} {net!r}: choose one of {', '.join(LPIPS_NETS)}")
    # pretrained=False / pnet_rand=True: torchmetrics builds the layers without fetching
    # anything; the weights come from the user's files below.
    lpips = _LPIPS(pretrained=False, net=net, pnet_rand=True)
    load_linear_layers(lpips, linear_path or bundled_linear_layers(net), net, options.linear)
    load_backbone(lpips, backbone_path, net, options.backbone)
    return lpips.eval().requires_grad_(False)


class LpipsDistance(nn.Module):
    """(pred, target) in [0, 1] -> LPIPS per image (B,): the evaluation metric."""

    def __init__(self, lpips: nn.Module):
        super().__init__()
        self.lpips = lpips

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.lpips(pred, target, normalize=True).flatten()


def load_lpips(backbone_path: str | Path, linear_path: str | Path | None, net: str = "alex",
               options: LpipsOptions = EVALUATE_OPTIONS) -> LpipsDistance:
    """The evaluation metric: a module mapping two [0, 1] batches to distances (B,)."""
    return LpipsDistance(load_lpips_network(backbone_path, linear_path, net, options))


def bundled_linear_layers(net: str) -> Path:
    """The lpips v0.1 linear layers torchmetrics ships with its wheel."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"


def read_state_dict(path: str | Path, option: str) -> dict[str, Tensor]:
    """A local torch state dict of tensors, read without unpickling objects; errors name
    `option` and the file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{option} {path}: no such file")
    try:
        # weights_only: tensors and plain containers only, so a crafted pickle cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # damaged, or refused by weights_only
        raise PipelineError(f"{option} {path}: not a readable torch state dict of tensors "
                            f"(damaged, or holding other objects, which are never loaded: "
                            f"unpickling them could run code)") from e
    except Exception as e:  # torch raises many types for a truncated or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{option} {path}: not a readable torch state dict ({reason})") from e
    if not isinstance(state, dict):
        raise PipelineError(f"{option} {path}: expected a state dict, got {type(state).__name__}")
    return state


def load_linear_layers(lpips: nn.Module, path: str | Path, net: str, option: str) -> None:
    state = read_state_dict(path, option)
    channels = LPIPS_NETS[net][1]
    for i, c in enumerate(channels):
        key = f"lin{i}.model.1.weight"
        if key not in state or tuple(state[key].shape) != (1, c, 1, 1):
            raise PipelineError(f"{option} {path}: expected {key} of shape (1, {c}, 1, 1) "
                                f"for the {net} backbone (the lpips package's "
                                f"weights/v0.1/{net}.pth format)")
    lpips.load_state_dict({f"lin{i}.model.1.weight": state[f"lin{i}.model.1.weight"]
                           for i in range(len(channels))}, strict=False)


def write_random_backbone(path: str | Path, net: str = "alex", seed: int = 0) -> Path:
    """A randomly initialised torchvision `net` backbone (seeded; the caller's RNG is left
    as it was) saved at `path` in the format `load_backbone` reads (`features.*`): LPIPS
    through it costs what the real network costs and ranks by one fixed random feature
    distance, with nothing downloaded (benchmarks, tests)."""
    import torchvision

    cuda = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):  # manual_seed seeds the GPUs too
        torch.manual_seed(seed)
        features = getattr(torchvision.models, LPIPS_NETS[net][0])(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return Path(path)


def load_backbone(lpips: nn.Module, path: str | Path, net: str, option: str) -> None:
    import torchvision

    state = read_state_dict(path, option)
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    reference = getattr(torchvision.models, LPIPS_NETS[net][0])(weights=None).features
    try:
        reference.load_state_dict({k[len("features."):]: v for k, v in features.items()})
    except RuntimeError as e:
        raise PipelineError(f"{option} {path}: not a torchvision {LPIPS_NETS[net][0]} state "
                            f"dict ({str(e).splitlines()[0]})") from e
    # torchmetrics' slices hold the backbone's layers under their original indices.
    for slice_ in (lpips.net.slice1, lpips.net.slice2, lpips.net.slice3, lpips.net.slice4,
                   lpips.net.slice5):
        for index, layer in slice_.named_children():
            layer.load_state_dict(reference[int(index)].state_dict())
