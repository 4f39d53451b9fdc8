"""The benchmark datasets: shapes, labels, splits, no download, the CIFAR-10 reader."""

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
    assert ds.x_train.shape == (4000, 1, 14, 14) and ds.x_test.shape == (1000, 1, 14, 14)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # the file is sorted by label: a shuffled split holds every class on both sides
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert not bool((ds.y_train[1:] >= ds.y_train[:-1]).all())
    counts = torch.bincount(torch.cat([ds.y_train, ds.y_test]), minlength=10)
    assert counts.tolist() == [500] * 10
    assert abs(float(ds.x_train.mean())) < 1e-3 and abs(float(ds.x_train.std()) - 1) < 1e-3
    flat = data.load_mnist5k(seed=0, size=28, flat=True, limit=300)
    assert flat.x_train.shape == (240, 784) and flat.x_test.shape == (60, 784)
    with pytest.raises(ValueError, match="size must be"):
        data.load_mnist5k(size=10)


def test_mnist5k_pixels_match_the_csv():
    import gzip

    with gzip.open(data.mnist5k_path(), "rt") as f:
        first = np.array(f.readline().split(","), dtype=np.float64)
    assert first.shape == (785,) and first[-1] == 0  # sorted by label: the first row is a zero
    ds = data.load_mnist5k(seed=3, size=28, flat=True)
    loaded = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()]).astype(np.float64)
    # standardization is one affine map for all pixels: the row is there up to it
    centered = loaded - loaded.mean(axis=1, keepdims=True)
    target = first[:784] - first[:784].mean()
    corr = centered @ target / (np.linalg.norm(centered, axis=1) * np.linalg.norm(target))
    assert corr.max() > 1 - 1e-6


def test_digits_flat_and_image():
    flat = data.load_digits(seed=0)
    assert flat.x_train.shape[1:] == (64,) and flat.x_train.shape[0] + flat.x_test.shape[0] == 1797
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
    assert ds.x_train.shape == (400, 40) and ds.x_test.shape == (100, 40)
    assert set(torch.cat([ds.y_train, ds.y_test]).tolist()) == set(range(10))
    again = data.load_mnist1d(seed=0, num_samples=500)
    assert torch.equal(again.x_train, ds.x_train)
    assert not torch.equal(data.load_mnist1d(seed=1, num_samples=500).x_train, ds.x_train)


def test_cifar10_reader_on_a_generated_directory(tmp_path):
    raw = write_cifar_dir(tmp_path / "cifar", per_batch=6, test=5)
    ds = data.load_cifar10(tmp_path / "cifar")
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    labels = np.concatenate([raw[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert ds.y_train.tolist() == labels.tolist()
    assert ds.y_test.tolist() == raw["test_batch"][1].tolist()
    # channel-major rows: pixel (c, i, j) is column c*1024 + i*32 + j, standardized per channel
    x = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    mean, std = x.mean(axis=(0, 2, 3), keepdims=True), x.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(ds.x_train.numpy(), (x - mean) / std, rtol=1e-4, atol=1e-4)
    limited = data.load_cifar10(tmp_path / "cifar", limit_train=7, limit_test=2)
    assert limited.x_train.shape[0] == 7 and limited.x_test.shape[0] == 2


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
    ds = data.synthetic_dataset((3, 8, 8), n_train=10, n_test=4)
    assert ds.x_train.shape == (10, 3, 8, 8) and ds.y_test.shape == (4,)
    assert ds.describe()["input_shape"] == [3, 8, 8]
