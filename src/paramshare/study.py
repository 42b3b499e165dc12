"""The study report: what tying buys, and when, from the finished runs of an MLflow store.

Runs are averaged over seeds only. Everything else that could change a result (the family's
own hyper-parameters, the data and training settings) splits cells, so two runs are never
averaged unless they differ in nothing but the seed.

The prepared-data digest cannot be part of that key as it stands: the prepare stage draws the
validation split and the labelled subset with the seed, so every seed has its own digest. It
is checked instead: the same data params and seed must always give the same digest. Where
they do not (the preparation changed between runs), those runs are keyed by digest as well,
and a note says so.
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlflow.tracking import MlflowClient
from scipy import stats
from sqlalchemy.exc import SQLAlchemyError

from paramshare import paths, tracking
from paramshare.config import FAMILIES
from paramshare.data import atomic_write, atomic_write_text
from paramshare.errors import TrackingError

PAGE_SIZE = 1000
REPORT = "study.md"
LEARNING_CURVES = "study_learning_curves.png"
ACCURACY_VS_PARAMS = "study_accuracy_vs_params.png"
COLUMNS = ("n labelled", "tied params", "untied params", "tied test acc", "untied test acc",
           "tied − untied (95% CI)", "tied gap", "untied gap")
COMMIT_PREFIX = re.compile(r"[0-9a-fA-F]{7,40}")
IGNORED_PARAMS = frozenset({"train.threads", "train.resume"})

Setting = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    run_name: str
    family: str
    tied: bool
    train_size: int
    seed: int
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    start_time: int
    git_commit: str

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test_acc")

    @property
    def data_digest(self) -> str:
        return self.tags.get("data_digest", "")

    @property
    def prepare_inputs(self) -> Setting:
        """What the prepare stage reads; equal inputs must give equal data digests."""
        data = {k: v for k, v in self.params.items() if k.startswith("data.")}
        return tuple(sorted({**data, "seed": str(self.seed)}.items()))


# --- reading the store ---------------------------------------------------------------------

def experiment_name(experiment: str | None = None) -> str:
    return experiment or os.environ.get(tracking.EXPERIMENT_ENV, tracking.DEFAULT_EXPERIMENT)


def describe_filters(commit: str | None = None, tags: dict[str, str] | None = None,
                     filter_string: str | None = None) -> str:
    parts = [f"commit {commit}"] if commit else []
    parts += [f"tag {k}={v}" for k, v in (tags or {}).items()]
    if filter_string:
        parts.append(f"filter {filter_string!r}")
    return ", ".join(parts) or "none"


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "active":
            return experiment.experiment_id
        existing = sorted(e.name for e in client.search_experiments())
    except (MlflowException, SQLAlchemyError) as exc:
        raise TrackingError(f"MLflow store {uri} cannot be opened: {tracking.store_error_line(exc)}") from None
    state = "is deleted" if experiment is not None else "does not exist"
    raise TrackingError(f"experiment {name!r} {state} in MLflow store {uri}; existing experiments: "
                        f"{', '.join(map(repr, existing)) or 'none'}")


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"tag value {value!r} holds both quote characters; use --filter instead")


def _search_filter(tags: dict[str, str] | None, filter_string: str | None) -> str:
    clauses = ["attributes.status = 'FINISHED'"]
    for key, value in (tags or {}).items():
        if "`" in key:
            raise TrackingError(f"tag name {key!r} holds a backtick; use --filter instead")
        clauses.append(f"tags.`{key}` = {_quote(value)}")
    if filter_string and filter_string.strip():
        clauses.append(filter_string.strip())
    return " and ".join(clauses)


def _search(client: MlflowClient, uri: str, experiment_id: str, filter_string: str,
            user_filter: str | None) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        try:
            page = client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY,
                                      max_results=PAGE_SIZE, page_token=token)
        except MlflowException as exc:
            if user_filter and exc.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE):
                raise TrackingError(f"invalid filter {user_filter!r}: {tracking.store_error_line(exc)}") from None
            raise TrackingError(f"MLflow store {uri} cannot be searched: {tracking.store_error_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise TrackingError(f"MLflow store {uri} cannot be searched: {tracking.store_error_line(exc)}") from None
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _git_commit(tags: dict[str, str]) -> str:
    return tags.get("git_commit") or tags.get("mlflow.source.git.commit") or ""


def _parse_bool(text: str | None) -> bool | None:
    return {"true": True, "false": False}.get((text or "").strip().lower())


def _parse_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def to_record(run: Run) -> RunRecord | None:
    """The run as a paramshare run; None for a run some other tool logged to the experiment."""
    params, tags = dict(run.data.params), dict(run.data.tags)
    family = params.get("family") or tags.get("family")
    tied = _parse_bool(params.get("model.tied", tags.get("tied")))
    train_size = _parse_int(params.get("data.train_size", tags.get("train_size")))
    seed = _parse_int(params.get("seed", tags.get("seed")))
    if not family or tied is None or train_size is None or seed is None:
        return None
    return RunRecord(run_id=run.info.run_id, run_name=run.info.run_name or run.info.run_id, family=family,
                     tied=tied, train_size=train_size, seed=seed, params=params, tags=tags,
                     metrics=dict(run.data.metrics), start_time=int(run.info.start_time or 0),
                     git_commit=_git_commit(tags))


def fetch_runs(experiment: str | None = None, commit: str | None = None, tags: dict[str, str] | None = None,
               filter_string: str | None = None) -> list[RunRecord]:
    """The finished paramshare runs matching every filter, oldest first.

    commit is a prefix (7 to 40 hex digits) of the `git_commit` tag; tags must match exactly;
    filter_string is an MLflow search filter, ANDed with the rest.
    """
    if commit is not None and not COMMIT_PREFIX.fullmatch(commit):
        raise TrackingError(f"commit {commit!r}: expected 7 to 40 hex digits of a git commit")
    uri = tracking.tracking_uri()
    name = experiment_name(experiment)
    client = tracking.open_store(uri)
    experiment_id = _experiment_id(client, uri, name)
    runs = _search(client, uri, experiment_id, _search_filter(tags, filter_string), filter_string)
    if commit is not None:
        runs = [r for r in runs if _git_commit(r.data.tags).lower().startswith(commit.lower())]
    where = f"experiment {name!r} of MLflow store {uri}"
    if not runs:
        raise TrackingError(f"no finished runs in {where} match the filters "
                            f"({describe_filters(commit, tags, filter_string)})")
    records = [r for r in map(to_record, runs) if r is not None]
    if not records:
        raise TrackingError(f"no paramshare runs (runs with a 'family' param) among the {len(runs)} "
                            f"finished runs in {where}")
    return sorted(records, key=lambda r: (r.start_time, r.run_id))


# --- cells ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellKey:
    """Everything a result depends on except the seed."""
    family: str
    tied: bool
    train_size: int
    setting: Setting

    @property
    def name(self) -> str:
        return f"{self.family}/{'tied' if self.tied else 'untied'}/n={self.train_size}"


def _reads(family: str, param: str) -> bool:
    if param in IGNORED_PARAMS or param in ("model.tied", "data.train_size"):
        return False
    return param.startswith(("data.", "train.", f"model.{family}."))


def cell_key(record: RunRecord, with_digest: bool = False) -> CellKey:
    setting = {k: v for k, v in record.params.items() if _reads(record.family, k)}
    if with_digest:
        setting["data_digest"] = record.data_digest
    return CellKey(record.family, record.tied, record.train_size, tuple(sorted(setting.items())))


def conflicting_data(records: Sequence[RunRecord]) -> dict[Setting, list[str]]:
    """Prepare inputs (data params and seed) that runs report more than one data digest for."""
    digests: dict[Setting, set[str]] = {}
    for r in records:
        digests.setdefault(r.prepare_inputs, set()).add(r.data_digest)
    return {inputs: sorted(found) for inputs, found in digests.items() if len(found) > 1}


class Summary(NamedTuple):
    n: int
    mean: float
    std: float | None


class Interval(NamedTuple):
    diff: float
    low: float | None
    high: float | None


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("mean_std of no values")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def summarise(values: Sequence[float]) -> Summary | None:
    return Summary(len(values), *mean_std(values)) if len(values) else None


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (Welch–Satterthwaite df).

    The bounds are None where the interval is undefined: fewer than two values on a side, or
    no spread on either side.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError("welch_interval needs values on both sides")
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return Interval(diff, None, None)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = vx + vy
    if se2 == 0:
        return Interval(diff, None, None)
    df = se2 ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df) * np.sqrt(se2))
    return Interval(diff, diff - half, diff + half)


@dataclass(frozen=True)
class Cell:
    """The runs of one cell, one per seed (the latest), and the runs they superseded."""
    key: CellKey
    runs: tuple[RunRecord, ...]
    superseded: tuple[RunRecord, ...] = ()

    @property
    def evaluated(self) -> tuple[RunRecord, ...]:
        return tuple(r for r in self.runs if r.test_acc is not None)

    @property
    def not_evaluated(self) -> tuple[RunRecord, ...]:
        return tuple(r for r in self.runs if r.test_acc is None)

    @property
    def test_accs(self) -> list[float]:
        return [r.metrics["test_acc"] for r in self.evaluated]

    @property
    def test_acc(self) -> Summary | None:
        return summarise(self.test_accs)

    @property
    def gap(self) -> Summary | None:
        return summarise([r.metrics["gap_train_test"] for r in self.evaluated if "gap_train_test" in r.metrics])

    @property
    def unique_param_values(self) -> list[int]:
        return sorted({int(r.metrics["unique_params"]) for r in self.runs if "unique_params" in r.metrics})

    @property
    def unique_params(self) -> int | None:
        values = self.unique_param_values
        return values[0] if values else None

    @property
    def commits(self) -> list[str]:
        return sorted({r.git_commit for r in self.runs if r.git_commit})


def _family_order(family: str) -> tuple[int, str]:
    return (FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), family)


def _cell_order(key: CellKey) -> tuple:
    return (_family_order(key.family), key.setting, key.train_size, not key.tied)


def group_runs(records: Sequence[RunRecord]) -> list[Cell]:
    """One cell per CellKey; of several runs of one (cell, seed), the latest is kept."""
    conflicts = conflicting_data(records)
    by_seed: dict[CellKey, dict[int, list[RunRecord]]] = {}
    for record in records:
        key = cell_key(record, with_digest=record.prepare_inputs in conflicts)
        by_seed.setdefault(key, {}).setdefault(record.seed, []).append(record)
    cells = []
    for key, seeds in by_seed.items():
        kept, superseded = [], []
        for seed in sorted(seeds):
            runs = sorted(seeds[seed], key=lambda r: (r.start_time, r.run_id))
            kept.append(runs[-1])
            superseded.extend(runs[:-1])
        cells.append(Cell(key, tuple(kept), tuple(superseded)))
    return sorted(cells, key=lambda c: _cell_order(c.key))


@dataclass(frozen=True)
class Comparison:
    """The tied and the untied cell (either may be missing) of one family, setting and size."""
    family: str
    setting: Setting
    train_size: int
    tied: Cell | None
    untied: Cell | None

    @property
    def difference(self) -> Interval | None:
        if self.tied is None or self.untied is None or not self.tied.evaluated or not self.untied.evaluated:
            return None
        return welch_interval(self.tied.test_accs, self.untied.test_accs)


def compare(cells: Sequence[Cell]) -> list[Comparison]:
    pairs: dict[tuple[str, Setting, int], dict[bool, Cell]] = {}
    for cell in cells:
        k = cell.key
        pairs.setdefault((k.family, k.setting, k.train_size), {})[k.tied] = cell
    return [Comparison(f, s, n, sides.get(True), sides.get(False))
            for (f, s, n), sides in sorted(pairs.items(), key=lambda p: (_family_order(p[0][0]), p[0][1], p[0][2]))]


def _shown(param: str, value: str) -> str:
    if param == "data_digest":
        return f"{param}={value[:12] or '(none)'}"
    return f"{param}={value}"


def setting_labels(cells: Sequence[Cell]) -> dict[tuple[str, Setting], str]:
    """Per family and setting, the params that tell it apart from the family's other settings."""
    settings: dict[str, set[Setting]] = {}
    for cell in cells:
        settings.setdefault(cell.key.family, set()).add(cell.key.setting)
    labels = {}
    for family, group in settings.items():
        dicts = {s: dict(s) for s in group}
        names = sorted({k for d in dicts.values() for k in d})
        varying = [k for k in names if len({d.get(k) for d in dicts.values()}) > 1]
        for s, d in dicts.items():
            labels[family, s] = ", ".join(_shown(k, d.get(k, "(unset)")) for k in varying)
    return labels


def common_setting(cells: Sequence[Cell]) -> list[str]:
    """The settings every given cell shares."""
    dicts = [dict(c.key.setting) for c in cells]
    if not dicts:
        return []
    return [_shown(k, v) for k, v in sorted(dicts[0].items()) if all(d.get(k) == v for d in dicts[1:])]


def _label(key: CellKey, labels: dict[tuple[str, Setting], str]) -> str:
    extra = labels.get((key.family, key.setting), "")
    return f"{key.name} [{extra}]" if extra else key.name


def notes(cells: Sequence[Cell]) -> list[str]:
    """What a reader must know to trust the tables: changed data, duplicates, mixed commits, unevaluated runs."""
    labels = setting_labels(cells)
    runs = [r for c in cells for r in c.runs + c.superseded]
    out = [f"data changed: runs with {', '.join(f'{k}={v}' for k, v in inputs)} were trained on "
           f"{len(digests)} different prepared datasets (digests {', '.join(d[:12] or '(none)' for d in digests)}); "
           "they are told apart by digest and not averaged across seeds"
           for inputs, digests in conflicting_data(runs).items()]
    for cell in cells:
        name = _label(cell.key, labels)
        for old in cell.superseded:
            kept = next(r for r in cell.runs if r.seed == old.seed)
            out.append(f"duplicate: {name} seed {old.seed} ran more than once; kept the latest run "
                       f"{kept.run_id[:8]}, ignored {old.run_id[:8]} ({old.run_name})")
        if len(cell.commits) > 1:
            out.append(f"mixed commits: {name} averages runs from {len(cell.commits)} git commits "
                       f"({', '.join(c[:8] for c in cell.commits)})")
        for run in cell.not_evaluated:
            out.append(f"not evaluated: {name} seed {run.seed}, run {run.run_id[:8]} ({run.run_name}) has no "
                       "test_acc; left out of the means")
        if len(cell.unique_param_values) > 1:
            out.append(f"unique params differ: {name} seeds report {', '.join(map(str, cell.unique_param_values))}; "
                       f"the table shows {cell.unique_params}")
    return out


# --- markdown ------------------------------------------------------------------------------

def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _std(s: Summary) -> str:
    return "n/a" if s.std is None else f"{100 * s.std:.2f}"


def format_acc(cell: Cell | None) -> str:
    if cell is None:
        return "missing"
    s = cell.test_acc
    if s is None:
        return f"not evaluated ({len(cell.runs)} {'run' if len(cell.runs) == 1 else 'runs'})"
    pending = f"; {len(cell.not_evaluated)} not evaluated" if cell.not_evaluated else ""
    return f"{100 * s.mean:.2f}% ± {_std(s)} ({_seeds(s.n)}{pending})"


def format_gap(cell: Cell | None) -> str:
    if cell is None:
        return "missing"
    s = cell.gap
    return "n/a" if s is None else f"{_pp(s.mean)} ± {_std(s)} pp"


def format_params(cell: Cell | None) -> str:
    if cell is None:
        return "missing"
    return "n/a" if cell.unique_params is None else f"{cell.unique_params:,}"


def format_difference(d: Interval | None) -> str:
    if d is None:
        return "n/a"
    if d.low is None or d.high is None:
        return f"{_pp(d.diff)} pp [n/a]"
    return f"{_pp(d.diff)} pp [{_pp(d.low)}, {_pp(d.high)}]"


def table(comparisons: Sequence[Comparison]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in comparisons:
        lines.append("| " + " | ".join([
            f"{c.train_size:,}", format_params(c.tied), format_params(c.untied), format_acc(c.tied),
            format_acc(c.untied), format_difference(c.difference), format_gap(c.tied), format_gap(c.untied)]) + " |")
    return "\n".join(lines)


def _where(c: Comparison, label: str) -> str:
    return f"n={c.train_size}" + (f" ({label})" if label else "")


def _joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _params_sentence(comparisons: Sequence[Comparison]) -> str | None:
    pairs = sorted({(c.tied.unique_params, c.untied.unique_params) for c in comparisons
                    if c.tied and c.untied and c.tied.unique_params and c.untied.unique_params})
    if not pairs:
        return None
    if all(t == u for t, u in pairs):
        return (f"Tied and untied models have the same number of unique parameters "
                f"({_joined([f'{t:,}' for t, _ in pairs])}).")
    parts = [f"{t:,} against {u:,} ({u / t:.2f}× as many untied)" for t, u in pairs]
    return f"Unique parameters, tied against untied: {_joined(parts)}."


def _gap_sentence(comparisons: Sequence[Comparison], labels: dict[Setting, str]) -> str | None:
    buckets: dict[str, list[str]] = {"smaller": [], "larger": [], "the same": []}
    for c in comparisons:
        tg, ug = (c.tied.gap if c.tied else None), (c.untied.gap if c.untied else None)
        if tg is None or ug is None:
            continue
        bucket = "smaller" if tg.mean < ug.mean else "larger" if tg.mean > ug.mean else "the same"
        buckets[bucket].append(f"{_where(c, labels[c.setting])} ({_pp(tg.mean)} vs {_pp(ug.mean)} pp)")
    parts = [f"{bucket} at {_joined(places)}" for bucket, places in buckets.items() if places]
    return f"The mean train–test gap, tied against untied, is {'; '.join(parts)}." if parts else None


def _not_compared(c: Comparison) -> str:
    reasons = [f"no {side} runs" if cell is None else f"{side} runs not evaluated"
               for side, cell in (("tied", c.tied), ("untied", c.untied)) if cell is None or not cell.evaluated]
    return ", ".join(reasons)


def family_summary(comparisons: Sequence[Comparison], labels: dict[Setting, str]) -> str:
    """A paragraph computed from the numbers of one family's comparisons."""
    wins, losses, unclear, no_interval, missing = [], [], [], [], []
    for c in comparisons:
        where = _where(c, labels[c.setting])
        d = c.difference
        if d is None:
            missing.append(f"{where} ({_not_compared(c)})")
        elif d.low is None or d.high is None:
            no_interval.append(f"{where} ({_pp(d.diff)} pp)")
        elif d.low > 0:
            wins.append(f"at {where} by {format_difference(d)}")
        elif d.high < 0:
            losses.append(f"at {where} by {format_difference(d)}")
        else:
            unclear.append(f"{where} ({format_difference(d)})")
    sentences = []
    if wins:
        sentences.append(f"Tying wins {_joined(wins)}.")
    if losses:
        sentences.append(f"Tying loses {_joined(losses)}.")
    if unclear:
        sentences.append(f"The 95% interval includes 0 at {_joined(unclear)}.")
    if no_interval:
        sentences.append(f"No interval (fewer than 2 evaluated seeds on a side, or no spread) at "
                         f"{_joined(no_interval)}.")
    if missing:
        sentences.append(f"Not compared: {_joined(missing)}.")
    for extra in (_params_sentence(comparisons), _gap_sentence(comparisons, labels)):
        if extra:
            sentences.append(extra)
    return " ".join(sentences)


def family_section(family: str, cells: Sequence[Cell], comparisons: Sequence[Comparison],
                   labels: dict[tuple[str, Setting], str]) -> str:
    own = [c for c in comparisons if c.family == family]
    by_setting = {s: labels[family, s] for s in dict.fromkeys(c.setting for c in own)}
    common = common_setting([c for c in cells if c.key.family == family])
    out = [f"## {family}", "", "Settings: " + ", ".join(f"`{_md(s)}`" for s in common), ""]
    for setting, label in by_setting.items():
        if len(by_setting) > 1:
            out += [f"### {family}: {_md(label)}", ""]
        out += [table([c for c in own if c.setting == setting]), ""]
    out += [_md(family_summary(own, by_setting)), ""]
    return "\n".join(out)


def _run_note(run: RunRecord, cell: Cell) -> str:
    if run in cell.superseded:
        return "superseded by a later run of this seed"
    return "not evaluated" if run.test_acc is None else ""


def runs_table(cells: Sequence[Cell]) -> str:
    labels = setting_labels(cells)
    lines = ["| run name | setting | run id | test acc | unique params | commit | note |",
             "|---|---|---|---|---|---|---|"]
    for cell in cells:
        setting = _md(labels[cell.key.family, cell.key.setting])
        for run in sorted(cell.runs + cell.superseded, key=lambda r: (r.seed, r.start_time)):
            acc = "not evaluated" if run.test_acc is None else f"{100 * run.test_acc:.2f}%"
            params = f"{int(run.metrics['unique_params']):,}" if "unique_params" in run.metrics else "n/a"
            lines.append(f"| {_md(run.run_name)} | {setting} | {run.run_id[:8]} | {acc} | {params} | "
                         f"{run.git_commit[:8] or 'n/a'} | {_run_note(run, cell)} |")
    return "\n".join(lines)


def render(cells: Sequence[Cell], *, source: str, generated: datetime | None = None) -> str:
    """The markdown report; source says which store, experiment and filters the runs came from."""
    generated = generated or datetime.now(UTC)
    comparisons = compare(cells)
    labels = setting_labels(cells)
    runs = sum(len(c.runs) + len(c.superseded) for c in cells)
    evaluated = sum(len(c.evaluated) for c in cells)
    families = sorted({c.key.family for c in cells}, key=_family_order)
    out = [
        "# Parameter tying on MNIST: what does it buy, and when",
        "",
        f"{_md(source)}. {runs} finished runs ({evaluated} evaluated and kept) in {len(cells)} cells. "
        f"Generated {generated.strftime('%Y-%m-%d %H:%M %Z').strip()}.",
        "",
        "A cell is one family, tied or untied, one training-set size and one setting of every other "
        "hyper-parameter the family reads; only seeds are averaged. Test accuracy: mean ± sample std "
        "(pp) over seeds. Gap: train minus test accuracy of the final model. tied − untied: difference "
        "of the mean test accuracies with a 95% Welch t interval. `missing`: no runs on that side; "
        "`n/a`: undefined (fewer than 2 evaluated seeds, or no spread).",
        "",
    ]
    for family in families:
        out.append(family_section(family, cells, comparisons, labels))
    out += ["## All runs", "", runs_table(cells), "", "## Notes", ""]
    out += [f"- {_md(n)}" for n in notes(cells)] or ["- none"]
    return "\n".join(out) + "\n"


def describe_source(uri: str, experiment: str, commit: str | None = None, tags: dict[str, str] | None = None,
                    filter_string: str | None = None) -> str:
    return (f"Runs from MLflow store `{uri}`, experiment `{experiment}`, filters: "
            f"{describe_filters(commit, tags, filter_string)}")


# --- figures -------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(**kwargs):
    """A figure on its own Agg canvas: no pyplot, no change to the process-wide backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _curve(cells: Sequence[Cell]) -> tuple[list[int], list[float], list[float]]:
    points = [(c.key.train_size, c.test_acc) for c in sorted(cells, key=lambda c: c.key.train_size) if c.test_acc]
    xs = [n for n, _ in points]
    ys = [100 * s.mean for _, s in points]
    errs = [float("nan") if s.std is None else 100 * s.std for _, s in points]
    return xs, ys, errs


def learning_curves_figure(cells: Sequence[Cell]) -> bytes:
    """Test accuracy against labelled-set size: one panel per family, tied solid, untied dashed."""
    families = sorted({c.key.family for c in cells}, key=_family_order)
    labels = setting_labels(cells)
    ncols = max(1, min(3, len(families)))
    nrows = max(1, -(-len(families) // ncols))
    fig = _figure(figsize=(4.6 * ncols, 3.6 * nrows), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, family in zip(axes, families):
        own = [c for c in cells if c.key.family == family]
        settings = list(dict.fromkeys(c.key.setting for c in own))
        for i, setting in enumerate(settings):
            for tied in (True, False):
                xs, ys, errs = _curve([c for c in own if c.key.setting == setting and c.key.tied == tied])
                if not xs:
                    continue
                colour = (f"C{i}" if len(settings) > 1 else "tab:blue" if tied else "tab:orange")
                name = ("tied" if tied else "untied") + (f" {labels[family, setting]}" if len(settings) > 1 else "")
                ax.errorbar(xs, ys, yerr=errs, color=colour, linestyle="-" if tied else "--",
                            marker="o" if tied else "s", capsize=3, label=name)
        if not ax.lines:
            ax.text(0.5, 0.5, "no evaluated runs", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        ax.set_title(family)
        ax.set_xlabel("labelled training images (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(families):]:
        ax.set_visible(False)
    return _png(fig)


def accuracy_vs_params_figure(cells: Sequence[Cell]) -> bytes:
    """One point per evaluated run: test accuracy against unique parameters."""
    fig = _figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    tops: dict[tuple[str, int], float] = {}
    for cell in cells:
        for run in cell.evaluated:
            if "unique_params" not in run.metrics:
                continue
            x, y = int(run.metrics["unique_params"]), 100 * run.metrics["test_acc"]
            tied = cell.key.tied
            ax.scatter(x, y, s=30, alpha=0.8, marker="o" if tied else "s",
                       color="tab:blue" if tied else "tab:orange", label="tied" if tied else "untied")
            where = (cell.key.family, x)
            tops[where] = max(tops.get(where, y), y)
    for (family, x), y in tops.items():
        ax.annotate(family, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    handles, names = ax.get_legend_handles_labels()
    by_name = dict(zip(names, handles))
    if by_name:
        ax.set_xscale("log")
        ax.legend(by_name.values(), by_name.keys())
    ax.set_xlabel("unique parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.margins(x=0.1)
    ax.set_title("Test accuracy against parameter count, every evaluated run")
    ax.grid(True, which="both", alpha=0.3)
    return _png(fig)


# --- entry points --------------------------------------------------------------------------

def _write_bytes(blob: bytes, fh) -> None:
    fh.write(blob)


def run_report(out_dir: Path = paths.REPORTS, experiment: str | None = None, commit: str | None = None,
               tags: dict[str, str] | None = None, filter_string: str | None = None) -> Path:
    """fetch -> group -> render; writes study.md and the two figures into out_dir."""
    name = experiment_name(experiment)
    records = fetch_runs(name, commit, tags, filter_string)
    cells = group_runs(records)
    text = render(cells, source=describe_source(tracking.tracking_uri(), name, commit, tags, filter_string))
    figures: dict[str, Callable[[Sequence[Cell]], bytes]] = {
        LEARNING_CURVES: learning_curves_figure, ACCURACY_VS_PARAMS: accuracy_vs_params_figure}
    pngs = {file: draw(cells) for file, draw in figures.items()}
    out_dir = Path(out_dir)
    for file, png in pngs.items():
        atomic_write(out_dir / file, functools.partial(_write_bytes, png))
    report = out_dir / REPORT
    atomic_write_text(report, text)
    evaluated = sum(len(c.evaluated) for c in cells)
    print(f"{report}: {len(records)} runs ({evaluated} evaluated) in {len(cells)} cells from experiment "
          f"{name!r}; figures {out_dir / LEARNING_CURVES}, {out_dir / ACCURACY_VS_PARAMS}")
    return report


def run_from_args(args: argparse.Namespace) -> Path:
    return run_report(args.out, args.experiment, args.commit, args.tags, args.filter_string)
