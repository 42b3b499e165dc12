"""`paramshare ...`: what users run by hand. Stage entry points share its error handling."""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import sys
from pathlib import Path
from typing import Callable

from paramshare import signals
from paramshare.config import ConfigError
from paramshare.data import DataError
from paramshare.distributed import PlacementError
from paramshare.errors import TrackingError
from paramshare.training import DivergedError


def guarded(main: Callable[[], object]) -> None:
    """Run main; known failures print one line to stderr and exit non-zero, no traceback.

    SIGTERM is turned into KeyboardInterrupt, so a terminated stage unwinds like Ctrl-C:
    its MLflow run is marked KILLED and no output is left half-written."""
    signals.install()
    try:
        main()
    except ConfigError as exc:
        print(f"error: params: {exc}", file=sys.stderr)
        sys.exit(2)
    except (DataError, DivergedError, PlacementError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except pickle.UnpicklingError as exc:
        print(f"error: {refused_pickle(exc)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def refused_pickle(exc: pickle.UnpicklingError) -> str:
    """torch.load(weights_only=True) refusing a file that would run code: its reason in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "global" in line.lower()), lines[0] if lines else "not plain tensors")
    return f"refused to load a model or checkpoint that is not plain tensors (weights_only=True): {reason}"


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


class _TagAction(argparse.Action):
    """--tag KEY=VALUE, repeatable, collected into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, value = str(values).partition("=")
        if not sep or not key.strip():
            parser.error(f"{option_string} {values!r}: expected KEY=VALUE")
        tags = dict(getattr(namespace, self.dest) or {})
        tags[key.strip()] = value
        setattr(namespace, self.dest, tags)


def _commit_arg(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 7 to 40 hex digits of a git commit")
    return text


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `paramshare report` (here, not in study.py, so that building the parser
    does not import MLflow and torch)."""
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or paramshare)")
    parser.add_argument("--commit", type=_commit_arg, default=None,
                        help="only runs whose git_commit tag starts with this (7 to 40 hex digits)")
    parser.add_argument("--tag", dest="tags", action=_TagAction, metavar="KEY=VALUE", default=None,
                        help="only runs with this tag value (repeatable)")
    parser.add_argument("--filter", dest="filter_string", default=None,
                        help="an MLflow search filter, e.g. \"params.`train.lr` = '0.001'\"")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output directory (default: reports)")


def cmd_report(args) -> None:
    from paramshare import study
    study.run_from_args(args)


def cmd_diff(args) -> None:
    from paramshare import runs
    print(runs.diff(args.run_a, args.run_b))


def cmd_reproduce(args) -> None:
    from paramshare import runs
    new_id, comparison = runs.reproduce(args.run_id)
    print(runs.render_comparison(comparison, args.run_id, new_id))
    if not comparison.identical:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="paramshare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a params file and print every resolved key")
    check.add_argument("--params", default="params.yaml")
    check.set_defaults(func=cmd_check)
    count = sub.add_parser("count", help="unique parameter counts of every family, tied and untied")
    count.add_argument("--params", default="params.yaml")
    count.set_defaults(func=cmd_count)
    report = sub.add_parser("report", help="the tied-vs-untied study report from the MLflow runs")
    add_report_arguments(report)
    report.set_defaults(func=cmd_report)
    diff = sub.add_parser("diff", help="what differs between two MLflow runs: params, tags, metrics")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.set_defaults(func=cmd_diff)
    reproduce = sub.add_parser("reproduce", help="re-train a run from its recorded commit and params in a "
                                                 "temporary worktree and compare every metric")
    reproduce.add_argument("run_id")
    reproduce.set_defaults(func=cmd_reproduce)
    args = parser.parse_args(argv)
    guarded(lambda: args.func(args))


if __name__ == "__main__":
    main()
