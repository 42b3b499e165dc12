import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def mirror_dir() -> Path | None:
    candidates = [os.environ.get("PARAMSHARE_MNIST_MIRROR", ""), str(ROOT.parent / "shared" / "data" / "mnist")]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file():
            return Path(c).resolve()
    return None


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local MNIST mirror; required in CI, a skip elsewhere."""
    found = mirror_dir()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no local MNIST mirror: set PARAMSHARE_MNIST_MIRROR")
        pytest.skip("no local MNIST mirror (set PARAMSHARE_MNIST_MIRROR)")
    return found


@pytest.fixture(scope="session")
def raw_mnist(mirror):
    from paramshare.data import load_raw
    return load_raw(mirror)


@pytest.fixture(scope="session")
def small_prepared(raw_mnist):
    from paramshare.data import prepare
    return prepare(raw_mnist, val_size=200, train_size=300, seed=0)


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)
