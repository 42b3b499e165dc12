"""DVC stage `train@FAMILY`: train one sharing family (tied or untied per model.tied)."""
import argparse

from paramshare import config, training
from paramshare.cli import guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("family", choices=config.FAMILIES)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dry-run", action="store_true", help="two batches per epoch (smoke test)")
    args = parser.parse_args()
    cfg = config.load(args.params)
    summary = training.train_variant(cfg, args.family, max_steps=2 if args.dry_run else None)
    print(f"train {args.family} tied={cfg.model.tied}: val_acc {summary['val_acc']:.4f}, "
          f"{summary['unique_params']:,} unique params, {summary['train_seconds']:.0f}s")


if __name__ == "__main__":
    guarded(main)
