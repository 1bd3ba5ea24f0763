"""Run under `torchrun --nproc_per_node 2`: `pipeline train` with the adversarial loss in a
real 2-rank gloo job, recording what tests/test_adversarial.py checks across ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/adversarial_ddp_check.py OUT \\
        <pipeline train options>

Each rank writes OUT/rank<r>.json after the last step: the sha256 of each parameter and
buffer of its autoencoder and of each tensor of its discriminator, the wrappers the two
models ran in, and for every micro-batch the adaptive weight it used (gradients averaged
across ranks) beside the one its own batch alone would have given.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from pipeline import train
from pipeline.models.losses import objective as objective_module
from pipeline.train import loop


def digest(named_tensors) -> dict[str, str]:
    """sha256 of each tensor, by name."""
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes())
            .hexdigest() for name, tensor in named_tensors}


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    records: dict = {"used": [], "local": []}
    real_weight, real_loop = objective_module.adaptive_weight, loop.train_loop

    def recording_weight(nll, g_loss, last_layer, *, mean_over_ranks=None, loss_scale=None):
        records["local"].append(real_weight(nll, g_loss, last_layer,
                                            loss_scale=loss_scale).item())
        weight = real_weight(nll, g_loss, last_layer, mean_over_ranks=mean_over_ranks,
                             loss_scale=loss_scale)
        records["used"].append(weight.item())
        return weight

    def recording_loop(run, state, stop):
        code = real_loop(run, state, stop)
        rank = run.accelerator.process_index
        records.update(world_size=run.accelerator.num_processes, rank=rank,
                       model=digest(run.module.named_parameters()),
                       model_buffers=digest(run.module.named_buffers()),
                       discriminator=digest(run.disc_module.state_dict().items()),
                       wrappers=[type(run.model).__name__, type(run.disc).__name__])
        (out / f"rank{rank}.json").write_text(json.dumps(records))
        return code

    objective_module.adaptive_weight = recording_weight
    loop.train_loop = recording_loop
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
