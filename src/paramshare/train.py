"""`python -m paramshare.train FAMILY`: train one sharing family (tied or untied per model.tied).

The train stage's entry point, and what torchrun runs on every process:
    torchrun --nproc_per_node=2 -m paramshare.train conv
With train.distributed: N, the stage itself hands over to torchrun with N local processes.
"""
from __future__ import annotations

import argparse

from paramshare import config, distributed, training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m paramshare.train", description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=config.FAMILIES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dry-run", action="store_true", help="two batches per epoch (smoke test)")
    args = parser.parse_args(argv)
    cfg = config.load(args.params)
    if cfg.train.distributed and not distributed.under_torchrun():
        distributed.resolve_device(cfg.train.device)
        distributed.relaunch(cfg.train.distributed, "paramshare.train",
                             [args.family, "--params", args.params] + (["--dry-run"] if args.dry_run else []))
    summary = training.train_variant(cfg, args.family, max_steps=2 if args.dry_run else None)
    if summary is not None:
        print(f"train {args.family} tied={cfg.model.tied}: val_acc {summary['val_acc']:.4f}, "
              f"{summary['unique_params']:,} unique params, {summary['train_seconds']:.0f}s")


if __name__ == "__main__":
    from paramshare.cli import guarded

    guarded(main)
