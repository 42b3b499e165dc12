"""Where each stage reads and writes, relative to the repository root (see dvc.yaml)."""
from pathlib import Path

RAW = Path("data/raw")
PREPARED = Path("data/prepared/mnist.pt")
PREPARED_META = Path("data/prepared/meta.json")
REPORTS = Path("reports")
SUMMARY = Path("metrics/summary.json")


def model_dir(family: str) -> Path:
    return Path("models") / family


def checkpoint(family: str, key: str) -> Path:
    """Per-epoch training state; outside DVC's outputs, which DVC deletes before a stage runs."""
    return Path("checkpoints") / f"{family}-{key}.pt"


def train_metrics(family: str) -> Path:
    return Path("metrics/train") / f"{family}.json"


def eval_metrics(family: str) -> Path:
    return Path("metrics/eval") / f"{family}.json"


def history(family: str) -> Path:
    return Path("plots/history") / f"{family}.json"


def confusion(family: str) -> Path:
    return Path("plots/confusion") / f"{family}.csv"
