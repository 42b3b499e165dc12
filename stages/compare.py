"""DVC stage `compare`: one report across the variants in params.yaml."""
import argparse

from paramshare import config, report
from paramshare.cli import guarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    cfg = config.load(parser.parse_args().params)
    report.compare(cfg.variants)
    print("compare: wrote reports/compare.md, reports/compare.png")


if __name__ == "__main__":
    guarded(main)
