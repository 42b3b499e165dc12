"""Run under torchrun by tests/test_distributed.py: train tiny models with DDP on this rank,
save each model's weights, last gradients, shared-tensor groups and history."""
import json
import sys
from pathlib import Path

import torch

from paramshare import distributed
from paramshare.config import TrainConfig
from paramshare.data import Prepared
from paramshare.metrics import shared_parameters
from paramshare.models import build
from paramshare.training import fit, seed_everything, set_threads

CASES = json.loads(sys.argv[3])


def main() -> None:
    data, out = Prepared.load(sys.argv[1]), Path(sys.argv[2])
    place = distributed.start("cpu")
    set_threads(1)
    try:
        for name, case in CASES.items():
            seed_everything(0)
            model = build(case["family"], case["tied"], case["hparams"])
            result = fit(model, data, TrainConfig(**case["train"]), 0, max_steps=case["max_steps"], placement=place)
            torch.save({"state": model.state_dict(),
                        "grads": {n: p.grad for n, p in model.named_parameters()},
                        "shared": shared_parameters(model),
                        "history": result.history}, out / f"{name}-rank{place.rank}.pt")
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
