"""Tables and figures from the evaluate stage's metrics files."""
from __future__ import annotations

import io
import json
from pathlib import Path

from paramshare import paths
from paramshare.data import atomic_write, atomic_write_json, atomic_write_text

COLUMNS = ("family", "shares across", "tied", "unique params", "test acc", "val acc",
           "train acc", "gap train-test", "train time (s)", "inference img/s")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def compare_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        tied = "n/a" if r["family"] == "mlp" else str(r["tied"]).lower()
        lines.append("| " + " | ".join([
            r["family"], r["shares_across"], tied, f"{r['unique_params']:,}", _pct(r["test_acc"]),
            _pct(r["val_acc"]), _pct(r["train_acc"]), f"{100 * r['gap_train_test']:+.2f} pp",
            f"{r['train_seconds']:.0f}", f"{r['inference_images_per_s']:,.0f}"]) + " |")
    return "\n".join(lines)


def accuracy_vs_params_figure(rows: list[dict]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in rows:
        ax.scatter(r["unique_params"], 100 * r["test_acc"], s=50,
                   marker="o" if r["tied"] else "s", color="tab:blue" if r["tied"] else "tab:orange")
        ax.annotate(r["family"], (r["unique_params"], 100 * r["test_acc"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    thousands = matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v / 1e3:g}k" if f"{v:.0e}"[0] in "125" else "")
    ax.xaxis.set_major_formatter(thousands)
    ax.xaxis.set_minor_formatter(thousands)
    ax.set_xlabel("unique parameters (log scale)")
    ax.set_ylabel("test accuracy (%)")
    tied = {r["tied"] for r in rows}
    ax.set_title("Test accuracy against parameter count (" +
                 ("tied" if tied == {True} else "untied" if tied == {False} else "mixed") + ")")
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def compare(variants) -> list[dict]:
    """The compare stage: reports/compare.{md,png}, a DVC plot and top-level metrics."""
    rows = [json.loads(paths.eval_metrics(v).read_text()) for v in variants]
    write_compare(rows, paths.REPORTS, paths.SUMMARY)
    return rows


def write_compare(rows: list[dict], out_dir: Path, summary_path: Path) -> None:
    labelled = {r["labelled"] for r in rows}
    text = "\n".join([
        "# Parameter sharing on MNIST: this experiment",
        "",
        f"Labelled training images: {', '.join(map(str, sorted(labelled)))}. "
        "Accuracy on the 10,000 MNIST test images; the gap is train minus test accuracy "
        "on the labelled set. `mlp` shares nothing: `model.tied` has no effect on it.",
        "",
        compare_table(rows),
        "",
        "Tied against untied: run `dvc exp run -S model.tied=false`, then `dvc exp show` "
        "or `dvc metrics diff`.",
        "",
    ])
    atomic_write_text(out_dir / "compare.md", text)
    png = accuracy_vs_params_figure(rows)
    atomic_write(out_dir / "compare.png", lambda fh: fh.write(png))
    csv = ["family,tied,unique_params,test_acc"] + [
        f"{r['family']},{str(r['tied']).lower()},{r['unique_params']},{r['test_acc']}" for r in rows]
    atomic_write_text(out_dir / "accuracy_vs_params.csv", "\n".join(csv) + "\n")
    atomic_write_json(summary_path, {
        r["family"]: {k: r[k] for k in ("test_acc", "val_acc", "gap_train_test", "unique_params",
                                        "train_seconds")} for r in rows})
