"""Tiny data files in the official formats, for tests that must not touch the network.

Each `write_fake_<name>(root, ...)` writes the files where torchvision (and popgrad's loader) expects
them under `root` and returns the arrays it wrote as {"train": (images, labels), "test": (...)},
with images uint8 (N, C, H, W) and labels int64, so tests can compare what the loader returns.
`write_fake_idx_folder` writes the four MNIST-format files into one flat folder (a `dataset.raw_dir`).

The files cannot match torchvision's MD5 checksums: load them with checksum verification switched off
(`monkeypatch.setattr(popgrad_cli.data, "_VERIFY_CHECKSUMS", False)` or `verify_checksums=False`).

Every class gets at least two examples per split, so stratified splits work.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

Arrays = Dict[str, Tuple[np.ndarray, np.ndarray]]
PathLike = Union[str, Path]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fake_arrays(
    n_train: int, n_test: int, channels: int, size: int, num_classes: int = 10, seed: int = 0
) -> Arrays:
    """Random uint8 images and balanced, shuffled labels for both splits."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        out[split] = (images, labels)
    return out


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array in IDX format (gzipped when the name ends with .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_fake_idx_folder(
    folder: PathLike, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0
) -> Arrays:
    """The four MNIST-format files, flat in `folder` (like Debian's /usr/share/datasets/fashion-mnist)."""
    arrays = fake_arrays(n_train, n_test, 1, 28, 10, seed)
    suffix = ".gz" if gz else ""
    for split, (image_name, label_name) in IDX_FILES.items():
        images, labels = arrays[split]
        write_idx(Path(folder) / (image_name + suffix), images[:, 0])
        write_idx(Path(folder) / (label_name + suffix), labels.astype(np.uint8))
    return arrays


def write_fake_mnist(root: PathLike, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> Arrays:
    """MNIST in torchvision's layout: <root>/MNIST/raw/*-idx?-ubyte[.gz]."""
    return write_fake_idx_folder(Path(root) / "MNIST" / "raw", n_train, n_test, gz, seed)


def write_fake_fashion_mnist(
    root: PathLike, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0
) -> Arrays:
    """Fashion-MNIST in torchvision's layout: <root>/FashionMNIST/raw/*-idx?-ubyte[.gz]."""
    return write_fake_idx_folder(Path(root) / "FashionMNIST" / "raw", n_train, n_test, gz, seed)


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_fake_cifar10(root: PathLike, n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Arrays:
    """CIFAR-10 python batches: <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    arrays = fake_arrays(5 * n_per_batch, n_test, 3, 32, 10, seed)
    folder = Path(root) / "cifar-10-batches-py"
    images, labels = arrays["train"]
    for i in range(5):
        part = slice(i * n_per_batch, (i + 1) * n_per_batch)
        _pickle(
            folder / f"data_batch_{i + 1}",
            {
                "batch_label": f"training batch {i + 1} of 5",
                "labels": labels[part].tolist(),
                "data": images[part].reshape(n_per_batch, -1),  # rows of 3072: R plane, G plane, B plane
                "filenames": [f"img_{j}.png" for j in range(n_per_batch)],
            },
        )
    test_images, test_labels = arrays["test"]
    _pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(), "data": test_images.reshape(n_test, -1)},
    )
    _pickle(
        folder / "batches.meta",
        {
            "num_cases_per_batch": n_per_batch,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_vis": 3072,
        },
    )
    return arrays


def write_fake_cifar100(root: PathLike, n_train: int = 200, n_test: int = 200, seed: int = 0) -> Arrays:
    """CIFAR-100 python files: <root>/cifar-100-python/{train, test, meta} (fine labels 0..99)."""
    arrays = fake_arrays(n_train, n_test, 3, 32, 100, seed)
    folder = Path(root) / "cifar-100-python"
    for split, name in (("train", "train"), ("test", "test")):
        images, labels = arrays[split]
        _pickle(
            folder / name,
            {
                "filenames": [f"img_{j}.png" for j in range(len(labels))],
                "batch_label": f"{split} batch",
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
                "data": images.reshape(len(labels), -1),
            },
        )
    _pickle(
        folder / "meta",
        {"fine_label_names": [f"class_{i}" for i in range(100)], "coarse_label_names": [f"super_{i}" for i in range(20)]},
    )
    return arrays


def write_fake_svhn(root: PathLike, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Arrays:
    """SVHN .mat files in <root>: X (32, 32, 3, N) uint8, y (N, 1) with digit 0 stored as label 10."""
    from scipy.io import savemat

    arrays = fake_arrays(n_train, n_test, 3, 32, 10, seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train_32x32.mat"), ("test", "test_32x32.mat")):
        images, labels = arrays[split]
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
        savemat(str(Path(root) / name), {"X": images.transpose(2, 3, 1, 0), "y": y})
    return arrays


def write_fake_stl10(root: PathLike, n_train: int = 20, n_test: int = 20, seed: int = 0) -> Arrays:
    """STL-10 binaries: <root>/stl10_binary/{train,test}_{X,y}.bin (images column-major, labels 1..10)."""
    arrays = fake_arrays(n_train, n_test, 3, 96, 10, seed)
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = arrays[split]
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(f"class_{i}" for i in range(10)) + "\n")
    return arrays


WRITERS = {
    "mnist": write_fake_mnist,
    "fashion_mnist": write_fake_fashion_mnist,
    "cifar10": write_fake_cifar10,
    "cifar100": write_fake_cifar100,
    "svhn": write_fake_svhn,
    "stl10": write_fake_stl10,
}


def write_fake(name: str, root: PathLike, seed: int = 0) -> Arrays:
    """Fake files for data set `name` in torchvision's layout under `root` (small default sizes)."""
    return WRITERS[name](root, seed=seed)
