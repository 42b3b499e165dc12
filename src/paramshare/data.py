"""MNIST: mirrors, download + verify, IDX parsing, stratified splits, the dataset digest.

The only module that touches the network. Every file is verified by the md5 of its
decompressed bytes, which are the canonical ones whatever gzip settings a mirror used.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

MIRROR_ENV = "PARAMSHARE_MNIST_MIRROR"
IMAGE_SIZE = 28
NUM_CLASSES = 10

FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
EXPECTED_COUNT = {"train": 60_000, "t10k": 10_000}


class DataError(RuntimeError):
    """A data file or source that cannot be used; the message names the file and the problem."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(fileobj) on a temp file beside path, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_bytes(blob: bytes, fh) -> None:
    fh.write(blob)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, functools.partial(_write_bytes, text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --- sources and download ----------------------------------------------------------------

def torchvision_mirrors() -> list[str]:
    from torchvision.datasets import MNIST
    return list(MNIST.mirrors)


def sources() -> list[str]:
    """Where to look, in order: $PARAMSHARE_MNIST_MIRROR first, then torchvision's mirrors."""
    local = os.environ.get(MIRROR_ENV, "").strip()
    return ([local] if local else []) + torchvision_mirrors()


def _is_url(source: str) -> bool:
    return "://" in source


def _fetch_bytes(source: str, name: str, timeout: float) -> bytes:
    """The bytes of name (gzip'ed, or plain where a local mirror holds it uncompressed)."""
    if _is_url(source):
        url = source.rstrip("/") + f"/{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise DataError(f"{name}.gz: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"{name}.gz: unreachable ({reason})") from None
    folder = Path(source)
    if not folder.is_dir():
        raise DataError("not a directory")
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate.read_bytes()
    raise DataError(f"{name}.gz: missing")


def decompress(blob: bytes, name: str) -> bytes:
    if blob[:2] != b"\x1f\x8b":
        if blob[:4] in (b"\x00\x00\x08\x03", b"\x00\x00\x08\x01"):
            return blob
        raise DataError(f"{name}: not gzip (starts with {blob[:16]!r})")
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{name}: corrupt or truncated gzip ({exc})") from None


def verify(raw: bytes, name: str) -> None:
    digest = hashlib.md5(raw).hexdigest()
    if digest != FILES[name]:
        raise DataError(f"{name}: md5 of decompressed bytes is {digest}, expected {FILES[name]}")


def download(dest: str | os.PathLike, timeout: float = 30.0, log=print) -> dict[str, str]:
    """Fetch and verify the four MNIST files into dest as NAME.gz; returns {name: source}.

    A file already in dest and verified is kept. Each file is tried at every source in
    order; a bad or truncated one is discarded and the next source tried.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    srcs = sources()
    used: dict[str, str] = {}
    for name in FILES:
        target = dest / f"{name}.gz"
        if target.is_file():
            try:
                verify(decompress(target.read_bytes(), name), name)
                used[name] = str(target)
                continue
            except DataError:
                target.unlink()
        failures = []
        for source in srcs:
            try:
                blob = _fetch_bytes(source, name, timeout)
                verify(decompress(blob, name), name)
            except DataError as exc:
                failures.append(f"{source}: {exc}")
                log(f"download: {source}: {exc}; trying the next source")
                continue
            if blob[:2] != b"\x1f\x8b":
                blob = gzip.compress(blob, mtime=0)
            atomic_write(target, functools.partial(_write_bytes, blob))
            used[name] = source
            log(f"download: {name} verified from {source}")
            break
        else:
            tried = "; ".join(failures) or "no sources"
            raise DataError(
                f"could not get a verified {name} from any of {len(srcs)} sources ({tried}). "
                f"Point {MIRROR_ENV} at a directory or URL holding the MNIST .gz files, "
                f"e.g. export {MIRROR_ENV}=../shared/data/mnist")
    return used


# --- IDX parsing -------------------------------------------------------------------------

def parse_idx(raw: bytes, name: str) -> torch.Tensor:
    """Parse an unsigned-byte IDX file (images: 3 dims, labels: 1 dim) into a uint8 tensor."""
    kind = "images" if "images" in name else "labels"
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: {len(raw)} bytes is shorter than the IDX header")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = 0x800 + ndim
    if magic != expected_magic:
        raise DataError(f"{name}: magic number {magic:#010x}, expected {expected_magic:#010x} "
                        f"(unsigned-byte {kind})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    split = name.split("-")[0]
    if dims[0] != EXPECTED_COUNT.get(split, dims[0]):
        raise DataError(f"{name}: header says {dims[0]} items, expected {EXPECTED_COUNT[split]}")
    if kind == "images" and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise DataError(f"{name}: images are {dims[1]}x{dims[2]}, expected 28x28")
    size = 1
    for d in dims:
        size *= d
    if len(raw) != header + size:
        raise DataError(f"{name}: {len(raw) - header} data bytes, header promises {size}")
    tensor = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)
    if kind == "labels" and tensor.numel() and int(tensor.max()) >= NUM_CLASSES:
        raise DataError(f"{name}: label {int(tensor.max())} out of range 0..9")
    return tensor


def load_raw(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the four verified files: {'train_images', 'train_labels', 'test_images', 'test_labels'}."""
    folder = Path(folder)
    out = {}
    for name in FILES:
        path = folder / f"{name}.gz"
        if not path.is_file():
            raise DataError(f"{path}: missing; run the download stage first")
        tensor = parse_idx(decompress(path.read_bytes(), name), name)
        split = "train" if name.startswith("train") else "test"
        out[f"{split}_{'images' if 'images' in name else 'labels'}"] = tensor
    for split in ("train", "test"):
        if len(out[f"{split}_images"]) != len(out[f"{split}_labels"]):
            raise DataError(f"{split}: {len(out[f'{split}_images'])} images but "
                            f"{len(out[f'{split}_labels'])} labels")
    return out


# --- splits and digest -------------------------------------------------------------------

def stratified_quota(counts: list[int], n: int) -> list[int]:
    """Split n across classes in proportion to counts (largest remainder), at least one each."""
    total = sum(counts)
    exact = [n * c / total for c in counts]
    quota = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[: n - sum(quota)]:
        quota[i] += 1
    if n >= len(counts):
        for i in range(len(counts)):
            while quota[i] == 0:
                donor = max(range(len(counts)), key=lambda j: quota[j])
                quota[donor] -= 1
                quota[i] += 1
    return quota


def stratified_split(labels: torch.Tensor, n: int, generator: torch.Generator):
    """(taken, rest): index tensors, taken holding n indices in the class proportions of labels."""
    counts = torch.bincount(labels.long(), minlength=NUM_CLASSES).tolist()
    if not 0 < n <= len(labels):
        raise DataError(f"cannot take {n} of {len(labels)} examples")
    quota = stratified_quota(counts, n)
    taken, rest = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        taken.append(idx[: quota[c]])
        rest.append(idx[quota[c]:])
    return torch.sort(torch.cat(taken)).values, torch.sort(torch.cat(rest)).values


@dataclass
class Prepared:
    """The in-memory study data. train_* hold every non-validation training image (the soft
    family's autoencoder sees them all); labelled indexes the labelled subset within them."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    labelled: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, tensor in sorted(vars(self).items()):
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, lambda fh: torch.save(dict(vars(self)), fh))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Prepared":
        if not Path(path).is_file():
            raise DataError(f"{path}: missing; run the prepare stage first")
        return cls(**torch.load(path, weights_only=True))


def prepare(raw: dict[str, torch.Tensor], val_size: int, train_size: int, seed: int) -> Prepared:
    """Carve a stratified validation split from train, then a stratified labelled subset."""
    g = torch.Generator().manual_seed(seed)
    val_idx, rest_idx = stratified_split(raw["train_labels"], val_size, g)
    rest_labels = raw["train_labels"][rest_idx]
    if train_size > len(rest_idx):
        raise DataError(f"data.train_size {train_size} exceeds the {len(rest_idx)} training "
                        f"images left after the validation split")
    labelled, _ = stratified_split(rest_labels, train_size, g)
    return Prepared(
        train_images=raw["train_images"][rest_idx].clone(),
        train_labels=rest_labels.clone(),
        labelled=labelled,
        val_images=raw["train_images"][val_idx].clone(),
        val_labels=raw["train_labels"][val_idx].clone(),
        test_images=raw["test_images"].clone(),
        test_labels=raw["test_labels"].clone(),
    )


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1], the reference's Normalize(0.5, 0.5)."""
    return images.unsqueeze(1).float().div_(127.5).sub_(1.0)


def run_prepare(raw_dir, prepared_path, meta_path, val_size: int, train_size: int, seed: int) -> dict:
    """The prepare stage: parse, split, save the tensors and a meta file with the digest."""
    prepared = prepare(load_raw(raw_dir), val_size, train_size, seed)
    meta = {
        "digest": prepared.digest(),
        "train_pool": len(prepared.train_labels),
        "labelled": len(prepared.labelled),
        "val": len(prepared.val_labels),
        "test": len(prepared.test_labels),
        "labelled_per_class": torch.bincount(prepared.train_labels[prepared.labelled].long(),
                                             minlength=NUM_CLASSES).tolist(),
        "source_md5": FILES,
    }
    prepared.save(prepared_path)
    atomic_write_json(meta_path, meta)
    return meta


def read_digest(meta_path) -> str:
    return json.loads(Path(meta_path).read_text())["digest"]
