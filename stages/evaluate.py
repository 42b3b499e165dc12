"""DVC stage `evaluate@FAMILY`: score a trained model on test, validation and train data."""
import argparse

from paramshare import config, evaluation, training
from paramshare.cli import guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("family", choices=config.FAMILIES)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    cfg = config.load(args.params)
    training.set_threads(cfg.train.threads)
    result = evaluation.evaluate_variant(args.family)
    print(f"evaluate {args.family}: test_acc {result['test_acc']:.4f}, "
          f"gap {100 * result['gap_train_test']:+.2f} pp")


if __name__ == "__main__":
    guarded(main)
