import os
import signal
import subprocess
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


def interrupt_in_epoch_2(command, cwd, env, timeout: int) -> tuple[int, str]:
    """Start a train stage, SIGTERM it once it prints epoch 2; its exit status and stderr."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not proc.stdout.readline().startswith("epoch 2/"):
        pass
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def resumed_after(stdout: str) -> int:
    """The epoch a re-run train stage says it resumes after."""
    return int(stdout.split("resuming after epoch ")[1].split("/")[0])
