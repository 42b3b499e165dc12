"""`paramshare ...`: what users run by hand. Stage entry points share its error handling."""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Callable

from paramshare.config import ConfigError
from paramshare.data import DataError
from paramshare.errors import TrackingError
from paramshare.training import DivergedError


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def guarded(main: Callable[[], object]) -> None:
    """Run main; known failures print one line to stderr and exit non-zero, no traceback.

    SIGTERM is turned into KeyboardInterrupt, so a terminated stage unwinds like Ctrl-C:
    its MLflow run is marked KILLED and no output is left half-written."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except ConfigError as exc:
        print(f"error: params: {exc}", file=sys.stderr)
        sys.exit(2)
    except (DataError, DivergedError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def cmd_check(args) -> None:
    from paramshare import config
    cfg = config.load(args.params)
    for key, value in config.flatten(cfg.to_dict()).items():
        print(f"{key}: {value}")
    print(f"{args.params}: valid")


def cmd_count(args) -> None:
    from paramshare import config
    from paramshare.metrics import param_uses_count, unique_param_count
    from paramshare.models import SHARES_ACROSS, build
    cfg = config.load(args.params)
    print(f"{'family':<10} {'tied params':>12} {'untied params':>14} {'uses (tied)':>12}  shares across")
    for family in cfg.variants:
        hp = dataclasses.asdict(cfg.model.family(family))
        tied, untied = build(family, True, hp), build(family, False, hp)
        print(f"{family:<10} {unique_param_count(tied):>12,} {unique_param_count(untied):>14,} "
              f"{param_uses_count(tied):>12,}  {SHARES_ACROSS[family]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="paramshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a params file and print every resolved key")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(func=cmd_check)
    count = sub.add_parser("count", help="unique parameter counts of every family, tied and untied")
    count.add_argument("--params", default="params.yaml")
    count.set_defaults(func=cmd_count)
    args = parser.parse_args(argv)
    guarded(lambda: args.func(args))


if __name__ == "__main__":
    main()
