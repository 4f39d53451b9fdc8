"""The benchmark datasets: shapes, labels, the three disjoint parts (the validation part
stratified), no download, the CIFAR-10 reader, the standard library's text."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from psiopt.bench import data


def write_cifar_dir(root: Path, per_batch: int = 6, test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny directory in the CIFAR-10 python-pickle layout; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    raw = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(root / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": name.encode()}, f)
        raw[name] = (x, np.asarray(y))
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return raw


def test_mnist5k_shapes_labels_and_shuffle():
    ds = data.load_mnist5k(seed=0, size=14)
    assert ds.x_train.shape == (3333, 1, 14, 14) and ds.x_val.shape == (667, 1, 14, 14)
    assert ds.x_test.shape == (1000, 1, 14, 14)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # the file is sorted by label: a shuffled split holds every class on both sides
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert not bool((ds.y_train[1:] >= ds.y_train[:-1]).all())
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_val, ds.y_test]), minlength=10)
    assert counts.tolist() == [500] * 10
    # standardized with the training part's statistics (the CIFAR-10 test checks the other parts' too)
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-3
    flat = data.load_mnist5k(seed=0, size=28, flat=True, limit=300)
    assert flat.x_train.shape[0] + flat.x_val.shape[0] == 240 and flat.x_test.shape == (60, 784)
    with pytest.raises(ValueError, match="size must be"):
        data.load_mnist5k(size=10)


def test_mnist5k_pixels_match_the_csv():
    import gzip

    with gzip.open(data.mnist5k_path(), "rt") as f:
        first = np.array(f.readline().split(","), dtype=np.float64)
    assert first.shape == (785,) and first[-1] == 0  # sorted by label: the first row is a zero
    ds = data.load_mnist5k(seed=3, size=28, flat=True)
    loaded = np.concatenate([ds.x_train.numpy(), ds.x_val.numpy(), ds.x_test.numpy()]).astype(np.float64)
    # standardization is one affine map for all pixels: the row is there up to it
    centered = loaded - loaded.mean(axis=1, keepdims=True)
    target = first[:784] - first[:784].mean()
    corr = centered @ target / (np.linalg.norm(centered, axis=1) * np.linalg.norm(target))
    assert corr.max() > 1 - 1e-6


def test_digits_flat_and_image():
    flat = data.load_digits(seed=0)
    assert flat.x_train.shape[1:] == (64,)
    assert flat.x_train.shape[0] + flat.x_val.shape[0] + flat.x_test.shape[0] == 1797
    img = data.load_digits(seed=0, image=True)
    assert img.x_train.shape[1:] == (1, 8, 8)
    assert torch.equal(img.x_train.flatten(1), flat.x_train)
    other = data.load_digits(seed=1)
    assert not torch.equal(other.y_train, flat.y_train)


def test_mnist1d_is_generated_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated, not downloaded")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = data.load_mnist1d(seed=0, num_samples=500)
    assert np.array_equal(np.random.get_state()[1], before)  # global numpy state restored
    assert ds.x_train.shape[0] + ds.x_val.shape[0] == 400 and ds.x_test.shape == (100, 40)
    assert set(torch.cat([ds.y_train, ds.y_test]).tolist()) == set(range(10))
    again = data.load_mnist1d(seed=0, num_samples=500)
    assert torch.equal(again.x_train, ds.x_train)
    assert not torch.equal(data.load_mnist1d(seed=1, num_samples=500).x_train, ds.x_train)


def test_cifar10_reader_on_a_generated_directory(tmp_path):
    raw = write_cifar_dir(tmp_path / "cifar", per_batch=12, test=5)
    ds = data.load_cifar10(tmp_path / "cifar")
    assert ds.x_train.shape[1:] == (3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    labels = np.concatenate([raw[f"data_batch_{i}"][1] for i in range(1, 6)])
    train_idx, val_idx = data.carve_validation(labels, data.VALIDATION_FRACTION, 0)
    assert ds.y_train.tolist() == labels[train_idx].tolist() and ds.y_val.tolist() == labels[val_idx].tolist()
    assert ds.y_test.tolist() == raw["test_batch"][1].tolist()
    # channel-major rows: pixel (c, i, j) is column c*1024 + i*32 + j, standardized per channel
    # with the training part's statistics
    x = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    x_tr = x[train_idx]
    mean, std = x_tr.mean(axis=(0, 2, 3), keepdims=True), x_tr.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(ds.x_train.numpy(), (x_tr - mean) / std, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.x_val.numpy(), (x[val_idx] - mean) / std, rtol=1e-4, atol=1e-4)
    limited = data.load_cifar10(tmp_path / "cifar", limit_train=7, limit_test=2)
    assert limited.x_train.shape[0] + limited.x_val.shape[0] == 7 and limited.x_test.shape[0] == 2


def test_cifar10_errors(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_cifar10(tmp_path / "nowhere")
    root = tmp_path / "c"
    write_cifar_dir(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="lacks data_batch_3"):
        data.load_cifar10(root)
    write_cifar_dir(root)
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="cannot read CIFAR-10 file"):
        data.load_cifar10(root)
    write_cifar_dir(root)
    with open(root / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(data.DataError, match="3072"):
        data.load_cifar10(root)


def test_synthetic_dataset():
    ds = data.synthetic_dataset((3, 8, 8), n_train=10, n_test=4, n_val=3)
    assert ds.x_train.shape == (10, 3, 8, 8) and ds.y_test.shape == (4,) and ds.y_val.shape == (3,)
    assert ds.describe()["input_shape"] == [3, 8, 8] and ds.describe()["val_size"] == 3


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


@pytest.mark.parametrize(
    "load",
    [
        lambda: data.load_digits(seed=0),
        lambda: data.load_mnist5k(seed=0, size=7),
        lambda: data.load_mnist1d(seed=0, num_samples=1000),
    ],
    ids=["digits", "mnist5k", "mnist1d"],
)
def test_the_three_parts_are_disjoint_and_the_validation_part_is_stratified(load):
    ds = load()
    train, val, test = _rows(ds.x_train), _rows(ds.x_val), _rows(ds.x_test)
    # no sample is in two parts (these datasets hold no duplicate samples)
    assert len(train) == ds.x_train.shape[0] and len(val) == ds.x_val.shape[0] and len(test) == ds.x_test.shape[0]
    assert not (train & val) and not (train & test) and not (val & test)
    # one sixth of the training data, class by class
    rest = torch.cat([ds.y_train, ds.y_val])
    assert abs(ds.x_val.shape[0] - rest.numel() * data.VALIDATION_FRACTION) <= ds.num_classes / 2
    per_class_rest = torch.bincount(rest, minlength=ds.num_classes)
    per_class_val = torch.bincount(ds.y_val, minlength=ds.num_classes)
    expected = torch.round(per_class_rest.double() * data.VALIDATION_FRACTION)
    assert torch.equal(per_class_val.double(), expected)
    # the split is fixed: the same on every load
    again = load()
    assert torch.equal(again.x_val, ds.x_val) and torch.equal(again.y_train, ds.y_train)


def test_carve_validation_is_a_seeded_stratified_partition():
    y = np.repeat(np.arange(4), [60, 30, 12, 6])
    train, val = data.carve_validation(y, 1 / 6, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(y)))
    assert np.bincount(y[val]).tolist() == [10, 5, 2, 1]
    again_train, again_val = data.carve_validation(y, 1 / 6, seed=3)
    assert np.array_equal(again_val, val)
    assert not np.array_equal(data.carve_validation(y, 1 / 6, seed=4)[1], val)
    with pytest.raises(ValueError, match="validation fraction"):
        data.carve_validation(y, 1.0, seed=0)


def _fake_stdlib(root: Path, n_files: int = 30) -> list[bytes]:
    """A directory laid out like a standard library, with test folders and packages to skip."""
    texts = []
    for i in range(n_files):
        path = root / ("pkg" if i % 3 else "") / f"mod{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# module {i}\n".encode() + bytes(range(32, 127)) * (i + 1)
        path.write_bytes(text)
        texts.append((path.relative_to(root).as_posix(), text))
    for skipped in ("test/test_x.py", "pkg/tests/t.py", "site-packages/lib.py", "test_top.py", "_sysconfigdata_x.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"SKIPPED" * 50)
    return [text for _, text in sorted(texts)]


def test_stdlib_text_is_split_by_file_deterministically(tmp_path):
    texts = _fake_stdlib(tmp_path)
    ds = data.load_stdlib_text(context=8, max_bytes=10**6, val_windows=5, test_windows=7, root=tmp_path)
    # the files in path order, every 9th of ten to validation, every 10th to test, whole
    parts = {"train": b"", "val": b"", "test": b""}
    for i, text in enumerate(texts):
        parts[{8: "val", 9: "test"}.get(i % 10, "train")] += text
    assert bytes(ds.train.tolist()) == parts["train"]
    for x, y, part in ((ds.x_val, ds.y_val, "val"), (ds.x_test, ds.y_test, "test")):
        for row_x, row_y in zip(x.tolist(), y.tolist()):  # windows of that part only, labels shifted by one
            window = bytes(row_x + row_y[-1:])
            assert window in parts[part] and row_x[1:] == row_y[:-1]
    assert b"SKIPPED" not in parts["train"] + parts["val"] + parts["test"]
    assert ds.x_val.shape == (5, 8) and ds.x_test.shape == (7, 8)
    assert ds.source["val_files"] == 3 and ds.source["test_files"] == 3 and ds.source["train_files"] == 24
    assert ds.source["test_sha256"] == __import__("hashlib").sha256(parts["test"]).hexdigest()
    # deterministic; a budget stops at the first file that does not fit
    again = data.load_stdlib_text(context=8, max_bytes=10**6, val_windows=5, test_windows=7, root=tmp_path)
    assert torch.equal(again.train, ds.train) and torch.equal(again.x_test, ds.x_test)
    small = data.load_stdlib_text(context=8, max_bytes=sum(map(len, texts[:12])), val_windows=2, test_windows=2,
                                  root=tmp_path)  # fmt: skip
    assert small.source["train_files"] + small.source["val_files"] + small.source["test_files"] == 12
    with pytest.raises(data.DataError, match="raise max_bytes"):
        data.load_stdlib_text(context=8, max_bytes=sum(map(len, texts[:9])), root=tmp_path)


def test_stdlib_text_training_windows_and_the_real_library():
    ds = data.load_stdlib_text(context=32, max_bytes=400_000, val_windows=8, test_windows=8)
    assert ds.source["python_version"] == __import__("platform").python_version()
    idx = torch.tensor([0, 5, ds.n_train - 1])
    x, y = ds.train_batch(idx)
    assert x.shape == y.shape == (3, 32) and x.dtype == torch.int64
    assert torch.equal(x[1], ds.train[5:37]) and torch.equal(y[1], ds.train[6:38])
    assert torch.equal(y[2, -1], ds.train[-1])  # the last window ends at the last byte
    assert b"import" in bytes(ds.train[:20000].tolist())
