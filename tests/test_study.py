import dataclasses
import hashlib
import math
import shutil
import statistics
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats

from paramshare import study
from paramshare.config import Config, flatten, from_dict
from paramshare.errors import TrackingError

COMMIT_A = "a1b2c3d4e5f60718293a4b5c6d7e8f9011223344"
COMMIT_B = "ffee00112233445566778899aabbccddeeff0011"
EPOCHS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(tied: bool, n: int, seed: int, settings: dict | None = None) -> Config:
    """A validated Config; settings maps dotted keys to values, e.g. {"train.lr": 0.01}."""
    raw: dict = {"seed": seed, "data": {"train_size": n}, "model": {"tied": tied}}
    for dotted, value in (settings or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(raw)


def logged_params(family: str, cfg: Config) -> dict[str, str]:
    """What training logs, as MLflow stores it (every value a string)."""
    return {k: str(v) for k, v in {"family": family, **flatten(cfg.to_dict())}.items()}


def digest(cfg: Config) -> str:
    """Like the prepare stage's: the seed draws the splits, so each seed has its own digest."""
    return hashlib.sha256(f"{cfg.data.val_size}/{cfg.data.train_size}/{cfg.seed}".encode()).hexdigest()


def logged_tags(family: str, cfg: Config, commit: str) -> dict[str, str]:
    return {"family": family, "tied": str(cfg.model.tied).lower(), "train_size": str(cfg.data.train_size),
            "seed": str(cfg.seed), "data_digest": digest(cfg), "git_commit": commit, "git_dirty": "false",
            "mlflow.source.git.commit": commit, "dvc_stage": f"train@{family}"}


def train_metrics(acc: float, unique_params: int) -> list[tuple[str, float, int]]:
    per_epoch = {"train_loss": 0.1, "train_acc": acc + 0.01, "val_loss": 0.1, "val_acc": acc, "lr": 1e-3,
                 "epoch_seconds": 3.0, "images_per_s": 1000.0}
    rows = [(k, v, epoch) for epoch in range(1, EPOCHS + 1) for k, v in per_epoch.items()]
    return rows + [("train_seconds", 6.0, 0), ("unique_params", unique_params, 0), ("param_uses", unique_params, 0)]


def eval_metrics(test_acc: float, gap: float) -> list[tuple[str, float, int]]:
    values = {"test_acc": test_acc, "test_loss": 0.1, "gap_train_test": gap, "gap_val_test": 0.0,
              "inference_images_per_s": 2000.0, "eval_val_acc": test_acc, "eval_val_loss": 0.1,
              "eval_train_acc": test_acc + gap, "eval_train_loss": 0.05,
              **{f"test_acc_class_{c}": test_acc for c in range(10)}}
    return [(k, v, 0) for k, v in values.items()]


def log_run(client: MlflowClient, experiment_id: str, family: str, tied: bool, n: int, seed: int, *,
            test_acc: float | None, gap: float = 0.01, unique_params: int | None = None, status: str = "FINISHED",
            commit: str = COMMIT_A, start: int | None = None, settings: dict | None = None) -> str:
    """One run as the train (and, when test_acc is given, the evaluate) stage logs it."""
    cfg = config(tied, n, seed, settings)
    tie = "tied" if tied else "untied"
    run = client.create_run(experiment_id, start_time=start, tags=logged_tags(family, cfg, commit),
                            run_name=f"{family}/{tie}/n={n}/seed={seed}")
    now = int(time.time() * 1000)
    rows = train_metrics(test_acc or 0.9, unique_params or (1000 if tied else 5000))
    if test_acc is not None:
        rows += eval_metrics(test_acc, gap)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, step) for k, v, step in rows],
                     params=[Param(k, v) for k, v in logged_params(family, cfg).items()])
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised MLflow database with the experiment "paramshare", made once (schema creation is slow)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.create_experiment("paramshare")
    return path


@pytest.fixture
def client(empty_store, tmp_path, monkeypatch) -> MlflowClient:
    path = tmp_path / "mlflow.db"
    shutil.copy(empty_store, path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return MlflowClient(tracking_uri=f"sqlite:///{path}")


@pytest.fixture
def exp(client) -> str:
    return client.get_experiment_by_name("paramshare").experiment_id


def record(family: str, tied: bool, n: int, seed: int, test_acc: float | None = 0.9, start: int = 0,
           commit: str = COMMIT_A, unique_params: int = 1000, settings: dict | None = None) -> study.RunRecord:
    """A RunRecord as fetch_runs builds it, without a store."""
    cfg = config(tied, n, seed, settings)
    metrics = {"unique_params": float(unique_params)}
    if test_acc is not None:
        metrics |= {"test_acc": test_acc, "gap_train_test": 0.01}
    return study.RunRecord(run_id=f"{family}{int(tied)}{n}{seed}{start}".ljust(32, "0"),
                           run_name=f"{family}/{'tied' if tied else 'untied'}/n={n}/seed={seed}", family=family,
                           tied=tied, train_size=n, seed=seed, params=logged_params(family, cfg),
                           tags=logged_tags(family, cfg, commit), metrics=metrics, start_time=start,
                           git_commit=commit)


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    diff = statistics.mean(a) - statistics.mean(b)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    return diff, diff - half, diff + half


# --- statistics ----------------------------------------------------------------------------

def test_mean_std_is_the_sample_std_and_undefined_for_one_value():
    values = [0.981, 0.975, 0.9862, 0.979]
    mean, std = study.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert study.mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        study.mean_std([])


def test_welch_interval_textbook_case_with_four_degrees_of_freedom():
    diff, low, high = study.welch_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    half = 2.776 * math.sqrt(1 / 3 + 1 / 3)
    assert diff == pytest.approx(1.0)
    assert (low, high) == pytest.approx((1 - half, 1 + half), abs=1e-3)


def test_welch_interval_matches_the_formula_with_unequal_variances():
    a, b = [0.990, 0.985, 0.992, 0.981], [0.970, 0.990, 0.950]
    assert study.welch_interval(a, b) == pytest.approx(welch_by_hand(a, b))


def test_welch_interval_is_undefined_below_two_values_or_without_spread():
    diff, low, high = study.welch_interval([0.9], [0.8, 0.85])
    assert diff == pytest.approx(0.075) and (low, high) == (None, None)
    assert study.welch_interval([0.9, 0.9], [0.8, 0.8]) == (pytest.approx(0.1), None, None)


# --- grouping ------------------------------------------------------------------------------

def test_three_seed_cells_report_means_stds_and_the_welch_interval(client, exp):
    tied, untied = [0.9812, 0.9790, 0.9834], [0.9701, 0.9755, 0.9688]
    gaps = [0.012, 0.010, 0.015]
    for seed, (t, u, g) in enumerate(zip(tied, untied, gaps)):
        log_run(client, exp, "conv", True, 1000, seed, test_acc=t, gap=g, unique_params=211690)
        log_run(client, exp, "conv", False, 1000, seed, test_acc=u, gap=2 * g, unique_params=3000000)
    cells = study.group_runs(study.fetch_runs())
    assert [(c.key.tied, c.test_acc.n) for c in cells] == [(True, 3), (False, 3)]
    tied_cell, untied_cell = cells
    assert tied_cell.test_acc.mean == pytest.approx(statistics.mean(tied))
    assert tied_cell.test_acc.std == pytest.approx(statistics.stdev(tied))
    assert untied_cell.gap.mean == pytest.approx(statistics.mean([2 * g for g in gaps]))
    assert tied_cell.unique_params == 211690
    [comparison] = study.compare(cells)
    diff, low, high = welch_by_hand(tied, untied)
    assert comparison.difference == pytest.approx((diff, low, high))
    text = study.render(cells, source="test")
    row = next(line for line in text.splitlines() if line.startswith("| 1,000 |"))
    assert row.split(" | ")[1:6] == [
        "211,690", "3,000,000", f"{100 * statistics.mean(tied):.2f}% ± {100 * statistics.stdev(tied):.2f} (3 seeds)",
        f"{100 * statistics.mean(untied):.2f}% ± {100 * statistics.stdev(untied):.2f} (3 seeds)",
        f"{100 * diff:+.2f} pp [{100 * low:+.2f}, {100 * high:+.2f}]"]
    assert f"Tying wins at n=1000 by {100 * diff:+.2f} pp" in text


def test_runs_that_differ_in_anything_but_the_seed_are_never_averaged():
    records = [record("conv", True, 1000, 0, 0.98), record("conv", True, 1000, 1, 0.96),
               record("conv", True, 1000, 0, 0.50, settings={"train.lr": 0.01}),
               record("conv", True, 1000, 0, 0.60, settings={"model.conv.hidden": 64})]
    cells = study.group_runs(records)
    assert sorted((c.test_acc.n, round(c.test_acc.mean, 4)) for c in cells) == [(1, 0.5), (1, 0.6), (2, 0.97)]
    sections = study.render(cells, source="test").split("### conv: ")[1:]
    first_rows = {s.splitlines()[0]: next(line for line in s.splitlines() if line.startswith("| 1,000 |"))
                  for s in sections}
    assert first_rows.keys() == {"model.conv.hidden=64, train.lr=0.001", "model.conv.hidden=128, train.lr=0.001",
                                 "model.conv.hidden=128, train.lr=0.01"}
    assert "| 60.00% ± n/a (1 seed) |" in first_rows["model.conv.hidden=64, train.lr=0.001"]
    assert "| 97.00% ± 1.41 (2 seeds) |" in first_rows["model.conv.hidden=128, train.lr=0.001"]
    assert "| 50.00% ± n/a (1 seed) |" in first_rows["model.conv.hidden=128, train.lr=0.01"]


def test_other_families_params_variants_and_threads_do_not_split_a_cell():
    records = [record("conv", True, 1000, 0), record("conv", True, 1000, 1, settings={"model.attention.width": 128}),
               record("conv", True, 1000, 2, settings={"variants": ["conv"], "train.threads": 2})]
    [cell] = study.group_runs(records)
    assert cell.test_acc.n == 3


def test_seeds_average_although_each_has_its_own_data_digest():
    records = [record("conv", True, 1000, seed) for seed in range(3)]
    assert len({r.data_digest for r in records}) == 3
    [cell] = study.group_runs(records)
    assert cell.test_acc.n == 3 and study.notes([cell]) == []


def test_a_changed_preparation_splits_cells_by_digest_and_is_noted():
    changed = record("conv", True, 1000, 0, 0.5, start=5)
    changed = dataclasses.replace(changed, tags={**changed.tags, "data_digest": "0" * 64})
    cells = study.group_runs([record("conv", True, 1000, 0, 0.9), record("conv", True, 1000, 1, 0.9), changed])
    assert sorted(c.test_acc.n for c in cells) == [1, 1, 1]
    assert all(not c.superseded for c in cells)
    [note] = study.notes(cells)
    assert note.startswith("data changed: runs with data.train_size=1000, data.val_size=5000, seed=0 were trained "
                           "on 2 different prepared datasets") and "000000000000" in note


def test_a_missing_side_shows_missing_and_one_seed_shows_no_std_and_no_interval():
    records = [record("soft", True, 100, 0, 0.70),
               record("soft", True, 1000, 0, 0.90), record("soft", False, 1000, 0, 0.88)]
    text = study.render(study.group_runs(records), source="test")
    row_100 = next(line for line in text.splitlines() if line.startswith("| 100 |")).split(" | ")
    row_1000 = next(line for line in text.splitlines() if line.startswith("| 1,000 |")).split(" | ")
    assert row_100[2] == "missing" and row_100[4] == "missing" and row_100[5] == "n/a"
    assert row_100[3] == "70.00% ± n/a (1 seed)"
    assert row_1000[5] == "+2.00 pp [n/a]"
    assert "Not compared: n=100 (no untied runs)." in text
    assert "No interval (fewer than 2 evaluated seeds on a side, or no spread) at n=1000 (+2.00 pp)." in text


def test_duplicate_seed_keeps_the_latest_run_and_is_noted():
    old, new = record("mlp", True, 1000, 0, 0.50, start=1), record("mlp", True, 1000, 0, 0.97, start=2)
    [cell] = study.group_runs([new, old])
    assert cell.runs == (new,) and cell.superseded == (old,)
    assert cell.test_acc.mean == pytest.approx(0.97)
    [note] = study.notes([cell])
    assert note.startswith("duplicate: mlp/tied/n=1000 seed 0") and old.run_id[:8] in note
    assert "superseded by a later run" in study.render([cell], source="test")


def test_a_cell_mixing_commits_is_noted():
    cells = study.group_runs([record("mlp", True, 1000, 0, commit=COMMIT_A), record("mlp", True, 1000, 1,
                                                                                   commit=COMMIT_B)])
    assert [n for n in study.notes(cells) if n.startswith("mixed commits: mlp/tied/n=1000")]


def test_failed_and_unevaluated_runs_stay_out_of_the_means(client, exp):
    log_run(client, exp, "recurrent", True, 1000, 0, test_acc=0.95)
    log_run(client, exp, "recurrent", True, 1000, 1, test_acc=0.10, status="FAILED")
    log_run(client, exp, "recurrent", True, 1000, 2, test_acc=0.20, status="KILLED")
    pending = log_run(client, exp, "recurrent", True, 1000, 3, test_acc=None)
    records = study.fetch_runs()
    assert sorted(r.seed for r in records) == [0, 3]
    [cell] = study.group_runs(records)
    assert cell.test_acc == (1, pytest.approx(0.95), None)
    text = study.render([cell], source="test")
    assert "95.00% ± n/a (1 seed; 1 not evaluated)" in text
    assert f"| recurrent/tied/n=1000/seed=3 |  | {pending[:8]} | not evaluated |" in text
    assert f"not evaluated: recurrent/tied/n=1000 seed 3, run {pending[:8]}" in text


def test_a_cell_without_evaluated_runs_says_so():
    text = study.render(study.group_runs([record("conv", False, 1000, 0, None)]), source="test")
    assert "not evaluated (1 run)" in text and "Not compared: n=1000 (no tied runs, untied runs not evaluated)." in text


# --- fetching and filters ------------------------------------------------------------------

def test_filters_by_commit_prefix_tag_and_mlflow_filter(client, exp):
    log_run(client, exp, "conv", True, 1000, 0, test_acc=0.9, commit=COMMIT_A)
    log_run(client, exp, "mlp", True, 1000, 0, test_acc=0.9, commit=COMMIT_A, settings={"train.lr": 0.01})
    log_run(client, exp, "conv", True, 1000, 1, test_acc=0.9, commit=COMMIT_B)
    assert len(study.fetch_runs()) == 3
    assert {r.git_commit for r in study.fetch_runs(commit=COMMIT_A[:7].upper())} == {COMMIT_A}
    assert [r.family for r in study.fetch_runs(commit=COMMIT_A[:8], tags={"family": "mlp"})] == ["mlp"]
    assert [r.family for r in study.fetch_runs(filter_string="params.`train.lr` = '0.01'")] == ["mlp"]
    with pytest.raises(TrackingError, match="expected 7 to 40 hex digits"):
        study.fetch_runs(commit="a1b2")


def test_pages_are_followed_to_the_end(client, exp, monkeypatch):
    for seed in range(5):
        log_run(client, exp, "mlp", True, 100, seed, test_acc=0.8)
    monkeypatch.setattr(study, "PAGE_SIZE", 2)
    assert sorted(r.seed for r in study.fetch_runs()) == list(range(5))


def test_experiment_comes_from_the_environment(client, monkeypatch):
    other = client.create_experiment("sweep")
    log_run(client, other, "mlp", True, 100, 0, test_acc=0.8)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    assert len(study.fetch_runs()) == 1


def test_runs_of_other_tools_are_skipped_but_not_all_of_them(client, exp):
    foreign = client.create_run(exp, run_name="notebook")
    client.set_terminated(foreign.info.run_id)
    with pytest.raises(TrackingError, match=r"no paramshare runs .* among the 1 finished runs"):
        study.fetch_runs()
    log_run(client, exp, "mlp", True, 100, 0, test_acc=0.8)
    assert [r.family for r in study.fetch_runs()] == ["mlp"]


def test_a_missing_experiment_is_named_with_the_existing_ones(client):
    with pytest.raises(TrackingError, match=r"experiment 'nope' does not exist .*existing experiments: .*'paramshare'"):
        study.fetch_runs("nope")


def test_filters_that_match_nothing_are_named(client, exp):
    log_run(client, exp, "conv", True, 1000, 0, test_acc=0.9)
    with pytest.raises(TrackingError, match="match the filters \\(commit 1234567, tag family=mlp\\)"):
        study.fetch_runs(commit="1234567", tags={"family": "mlp"})
    with pytest.raises(TrackingError, match="no finished runs"):
        study.fetch_runs(tags={"family": "attention"})
    with pytest.raises(TrackingError, match="invalid filter 'params.lr ==='"):
        study.fetch_runs(filter_string="params.lr ===")


def test_a_store_that_cannot_be_opened_is_named_and_not_created(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir" / "x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    with pytest.raises(TrackingError, match=f"MLflow store sqlite:///{missing} cannot be opened: no database"):
        study.fetch_runs()
    assert not missing.parent.exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_text("this is not a database\n" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{garbage}")
    with pytest.raises(TrackingError, match=f"MLflow store sqlite:///{garbage} cannot be opened: .*not a database"):
        study.fetch_runs()


# --- the report ----------------------------------------------------------------------------

def test_run_report_writes_the_markdown_and_both_figures(client, exp, tmp_path, capsys):
    for seed, (t, u) in enumerate([(0.91, 0.89), (0.92, 0.88)]):
        log_run(client, exp, "attention", True, 100, seed, test_acc=t)
        log_run(client, exp, "attention", False, 100, seed, test_acc=u)
        log_run(client, exp, "attention", True, 1000, seed, test_acc=t + 0.05)
    log_run(client, exp, "mlp", True, 1000, 0, test_acc=0.95)
    out = tmp_path / "reports"
    report = study.run_report(out)
    assert report == out / "study.md"
    for name in (study.LEARNING_CURVES, study.ACCURACY_VS_PARAMS):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 1000
    text = report.read_text()
    assert f"MLflow store `sqlite:///{tmp_path / 'mlflow.db'}`, experiment `paramshare`, filters: none" in text
    assert "7 finished runs (7 evaluated and kept) in 4 cells" in text
    # two seeds a side, equal spread: Welch df = 2, half-width t(0.975, 2) * sqrt(0.71²/2 + 0.71²/2) = 4.303 * 0.71
    assert "| 100 | 1,000 | 5,000 | 91.50% ± 0.71 (2 seeds) | 88.50% ± 0.71 (2 seeds) | +3.00 pp [-0.04, +6.04] |" \
        in text
    assert "| 1,000 | 1,000 | missing | 96.50% ± 0.71 (2 seeds) | missing | n/a |" in text
    assert "## mlp" in text and "## All runs" in text and "## Notes" in text
    assert "study.md: 7 runs" in capsys.readouterr().out
