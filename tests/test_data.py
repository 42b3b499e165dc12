import functools
import gzip
import http.server
import threading

import pytest
import torch

from paramshare import data
from paramshare.data import FILES, DataError, decompress, parse_idx, stratified_split


def idx_bytes(magic: int, dims: list[int], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + payload


def test_parse_images_and_labels():
    images = parse_idx(idx_bytes(0x803, [2, 28, 28], bytes(range(256)) * 6 + bytes(32)), "x-images-idx3-ubyte")
    assert images.shape == (2, 28, 28) and images.dtype == torch.uint8
    assert images[0, 0, :3].tolist() == [0, 1, 2]
    labels = parse_idx(idx_bytes(0x801, [3], bytes([0, 9, 4])), "x-labels-idx1-ubyte")
    assert labels.tolist() == [0, 9, 4]


@pytest.mark.parametrize("name, blob, problem", [
    ("x-labels-idx1-ubyte", idx_bytes(0x803, [3], bytes(3)), "magic number 0x00000803, expected 0x00000801"),
    ("x-images-idx3-ubyte", idx_bytes(0x803, [1, 28, 27], bytes(28 * 27)), "images are 28x27"),
    ("x-images-idx3-ubyte", idx_bytes(0x803, [2, 28, 28], bytes(784)), "784 data bytes, header promises 1568"),
    ("x-labels-idx1-ubyte", idx_bytes(0x801, [2], bytes([3, 10])), "label 10 out of range"),
    ("t10k-labels-idx1-ubyte", idx_bytes(0x801, [5], bytes(5)), "header says 5 items, expected 10000"),
    ("x-labels-idx1-ubyte", b"\x00\x00", "shorter than the IDX header"),
])
def test_parse_rejects_bad_files_with_the_file_and_problem(name, blob, problem):
    with pytest.raises(DataError) as err:
        parse_idx(blob, name)
    assert str(err.value).startswith(name + ":")
    assert problem in str(err.value)


def test_corrupt_truncated_and_html_blobs():
    good = gzip.compress(idx_bytes(0x801, [1], bytes([1])))
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        decompress(good[: len(good) // 2], "f")
    with pytest.raises(DataError, match="not gzip"):
        decompress(b"<html><body>Not Found</body></html>", "f")
    with pytest.raises(DataError, match="md5 of decompressed bytes"):
        data.verify(b"whatever", "train-labels-idx1-ubyte")


def test_real_files_parse_with_the_canonical_shapes(raw_mnist):
    assert raw_mnist["train_images"].shape == (60000, 28, 28)
    assert raw_mnist["test_labels"].shape == (10000,)
    assert torch.bincount(raw_mnist["train_labels"].long()).tolist()[:2] == [5923, 6742]


def test_download_from_a_local_directory_mirror(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    monkeypatch.setattr(data, "torchvision_mirrors", lambda: [])
    used = data.download(tmp_path / "raw", log=lambda _: None)
    assert set(used.values()) == {str(mirror)}
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(f"{n}.gz" for n in FILES)
    again = data.download(tmp_path / "raw", log=lambda _: None)
    assert all(v.startswith(str(tmp_path)) for v in again.values())


@pytest.fixture
def http_mirrors(mirror, tmp_path):
    """Three local HTTP mirrors: one serves corrupt or HTML files, one lacks files, one is good."""
    roots = {k: tmp_path / k for k in ("corrupt", "missing", "good")}
    for root in roots.values():
        root.mkdir()
    for name in FILES:
        blob = (mirror / f"{name}.gz").read_bytes()
        (roots["good"] / f"{name}.gz").write_bytes(blob)
        bad = blob[: len(blob) // 3] if "images" in name else b"<html>503 Service Unavailable</html>"
        (roots["corrupt"] / f"{name}.gz").write_bytes(bad)
    servers, urls = [], {}
    for key, root in roots.items():
        handler = functools.partial(QuietHandler, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls[key] = f"http://127.0.0.1:{server.server_address[1]}/"
    yield urls
    for server in servers:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_over_http_skips_bad_and_missing_sources(http_mirrors, tmp_path, monkeypatch):
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    monkeypatch.setattr(data, "torchvision_mirrors",
                        lambda: [http_mirrors["corrupt"], http_mirrors["missing"], http_mirrors["good"]])
    messages = []
    used = data.download(tmp_path / "raw", log=messages.append)
    assert set(used.values()) == {http_mirrors["good"]}
    assert any("corrupt or truncated gzip" in m for m in messages)
    assert any("not gzip" in m for m in messages)
    assert any("HTTP 404" in m for m in messages)
    raw = data.load_raw(tmp_path / "raw")
    assert raw["train_images"].shape == (60000, 28, 28)
    assert [p.name for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")] == []


def test_download_fails_with_every_source_and_a_hint(http_mirrors, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "torchvision_mirrors", lambda: [http_mirrors["corrupt"], http_mirrors["missing"]])
    with pytest.raises(DataError) as err:
        data.download(tmp_path / "raw", log=lambda _: None)
    message = str(err.value)
    assert "from any of 3 sources" in message
    assert "nowhere: not a directory" in message
    assert f"{http_mirrors['corrupt']}: train-images-idx3-ubyte: corrupt or truncated gzip" in message
    assert f"{http_mirrors['missing']}: train-images-idx3-ubyte.gz: HTTP 404" in message
    assert "PARAMSHARE_MNIST_MIRROR" in message
    assert list((tmp_path / "raw").iterdir()) == []


def test_a_corrupt_file_already_present_is_replaced(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    monkeypatch.setattr(data, "torchvision_mirrors", lambda: [])
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    used = data.download(dest, log=lambda _: None)
    assert used["t10k-labels-idx1-ubyte"] == str(mirror)
    data.verify(decompress((dest / "t10k-labels-idx1-ubyte.gz").read_bytes(), "t10k-labels-idx1-ubyte"),
                "t10k-labels-idx1-ubyte")


def test_stratified_split_is_exact_disjoint_and_seeded():
    labels = torch.arange(1000) % 10
    labels[:100] = 3
    taken, rest = stratified_split(labels, 57, torch.Generator().manual_seed(1))
    assert len(taken) == 57 and len(rest) == 943
    assert len(set(taken.tolist()) | set(rest.tolist())) == 1000
    counts = torch.bincount(labels[taken], minlength=10)
    expected = 57 * torch.bincount(labels, minlength=10) / 1000
    assert (counts - expected).abs().max() < 1
    again, _ = stratified_split(labels, 57, torch.Generator().manual_seed(1))
    other, _ = stratified_split(labels, 57, torch.Generator().manual_seed(2))
    assert torch.equal(taken, again) and not torch.equal(taken, other)


def test_smallest_subset_has_one_example_per_class():
    labels = torch.cat([torch.zeros(500), torch.arange(10).repeat(5)]).long()
    taken, _ = stratified_split(labels, 10, torch.Generator().manual_seed(0))
    assert sorted(labels[taken].tolist()) == list(range(10))


def test_prepare_splits_and_digest(raw_mnist):
    a = data.prepare(raw_mnist, val_size=1000, train_size=500, seed=0)
    assert len(a.val_labels) == 1000 and len(a.train_labels) == 59000 and len(a.labelled) == 500
    assert torch.bincount(a.train_labels[a.labelled].long()).min() >= 40
    assert a.digest() == data.prepare(raw_mnist, val_size=1000, train_size=500, seed=0).digest()
    assert a.digest() != data.prepare(raw_mnist, val_size=1000, train_size=500, seed=1).digest()
    with pytest.raises(DataError, match="exceeds the 59000 training images"):
        data.prepare(raw_mnist, val_size=1000, train_size=59001, seed=0)


def test_prepared_round_trip(small_prepared, tmp_path):
    path = tmp_path / "p.pt"
    small_prepared.save(path)
    back = data.Prepared.load(path)
    assert back.digest() == small_prepared.digest()
    with pytest.raises(DataError, match="run the prepare stage first"):
        data.Prepared.load(tmp_path / "none.pt")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"

    def explode(fh):
        fh.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        data.atomic_write(target, explode)
    assert list(tmp_path.iterdir()) == []
    data.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
