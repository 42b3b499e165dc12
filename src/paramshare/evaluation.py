"""The evaluate stage: score a trained model without re-training it."""
from __future__ import annotations

import json

import torch
from torch import nn

from paramshare import metrics as m
from paramshare import paths
from paramshare.data import Prepared, atomic_write_json, atomic_write_text, normalise
from paramshare.models import SHARES_ACROSS, build


def load_trained(family: str) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its checkpoint (tensors only: weights_only=True)."""
    checkpoint = torch.load(paths.model_dir(family) / "model.pt", weights_only=True)
    model = build(checkpoint["family"], checkpoint["tied"], checkpoint["hparams"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def evaluate_variant(family: str) -> dict:
    """Test/val/train accuracy and loss, per-class accuracy, confusion, gaps, throughput;
    written to metrics/eval and added to the model's MLflow run."""
    from paramshare import tracking

    model, checkpoint = load_trained(family)
    data = Prepared.load(paths.PREPARED)
    test_images = normalise(data.test_images)
    test = m.evaluate_split(model, test_images, data.test_labels)
    val = m.evaluate_split(model, normalise(data.val_images), data.val_labels)
    train = m.evaluate_split(model, normalise(data.train_images[data.labelled]),
                             data.train_labels[data.labelled])
    matrix = m.confusion(data.test_labels, test["pred"])
    trained = json.loads(paths.train_metrics(family).read_text())
    result = {
        "family": family,
        "tied": checkpoint["tied"],
        "shares_across": SHARES_ACROSS[family],
        "labelled": len(data.labelled),
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        "train_acc": train["acc"],
        "train_loss": train["loss"],
        "gap_train_test": train["acc"] - test["acc"],
        "gap_val_test": val["acc"] - test["acc"],
        "per_class_test_acc": {str(c): a for c, a in enumerate(m.per_class_accuracy(matrix))},
        "unique_params": m.unique_param_count(model),
        "inference_images_per_s": m.inference_throughput(model, test_images),
        "train_seconds": trained["train_seconds"],
    }
    rows = ["actual,predicted"] + [f"{a},{p}" for a, p in zip(data.test_labels.tolist(), test["pred"].tolist())]
    atomic_write_text(paths.confusion(family), "\n".join(rows) + "\n")
    atomic_write_json(paths.eval_metrics(family), result)

    logged = {k: result[k] for k in ("test_acc", "test_loss", "gap_train_test", "gap_val_test",
                                     "inference_images_per_s")}
    logged.update({f"eval_{k}": result[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")})
    logged.update({f"test_acc_class_{c}": a for c, a in result["per_class_test_acc"].items()})
    run_id = json.loads((paths.model_dir(family) / "run.json").read_text())["run_id"]
    if not tracking.log_to_run(run_id, logged):
        print(f"evaluate: MLflow run {run_id} is not in {tracking.tracking_uri()}; "
              f"metrics are in {paths.eval_metrics(family)} only")
    return result
