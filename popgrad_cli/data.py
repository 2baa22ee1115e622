"""Data sets: decode once into a uint8 tensor cache, split, and transform whole batches on the device.

Every data set except `digits` is read through its torchvision class from `data.root`, in torchvision's
own folder layout (so a folder filled by torchvision elsewhere works here too), or from `dataset.raw_dir`,
a flat folder holding the same files. The files are checked against torchvision's MD5 checksums, decoded
once, and cached as uint8 tensors (N, C, H, W) plus int64 labels in

    <data.root>/popgrad-cache/<name>/{train,test}.pt                      (files from data.root)
    <data.root>/popgrad-cache/<name>-rawdir-<hash of raw_dir>/{...}.pt    (files from dataset.raw_dir)

Cache files are written to a temporary file in the same folder and renamed into place, and building is
serialised by an flock on `<cache folder>/.lock`, so sweep jobs sharing data.root neither corrupt the
cache nor decode the same data set twice at the same time. Readers need no lock.

Training then needs no per-sample Python: `load_splits` returns whole splits as device tensors and
`BatchTransform` converts, augments (vectorised random crop and flip) and normalises a batch on the device.

Every problem the user can fix (missing, corrupt or unreadable files, an unwritable cache, a bad size)
raises `DataError` with a message meant for the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets as tv_datasets
from torchvision.datasets.utils import calculate_md5, extract_archive

log = logging.getLogger(__name__)

CACHE_DIRNAME = "popgrad-cache"
CACHE_FORMAT_VERSION = 1
SPLITS = ("train", "test")

# Digits has no official train/test split. We use a fixed, stratified 80/20 split drawn with this seed,
# which is independent of the run seed, so every run sees the same test set (see digits_test_indices).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

# Checksum verification of raw files. The public entry points always verify; tests that build tiny fake
# files in the official formats (which cannot match the official MD5s) switch it off by monkeypatching
# this flag or by passing verify_checksums=False to the internal `_ensure_cache` / `_load_full`.
_VERIFY_CHECKSUMS = True

# Seconds before a download attempt gives up on an unresponsive server (torchvision sets no timeout).
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(Exception):
    """A data problem the user can fix; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawFile:
    """One file a data set needs, named relative to the data set's folder.

    md5: checksum of the file as stored (None: unknown, existence is checked only).
    gz_md5: for IDX files, which may also be present gzipped as `name + ".gz"`: the checksum of that
        .gz file as published (torchvision's `resources`). A .gz whose own checksum differs (e.g. one
        recompressed by a distribution) is accepted when its decompressed content matches `md5`.
    """

    name: str
    md5: Optional[str]
    gz_md5: Optional[str] = None

    @property
    def gzip_ok(self) -> bool:
        return self.gz_md5 is not None

    @property
    def display_name(self) -> str:
        """The name users are told to fetch (the .gz as published for IDX files)."""
        return self.name + ".gz" if self.gzip_ok else self.name


Decoded = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
Decoder = Callable[["DatasetSpec", Dict[str, Path], Path], Decoded]


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader needs to know about one data set."""

    name: str
    title: str
    tv_class: Optional[type]  # torchvision dataset class; None for digits
    channels: int
    image_size: int
    num_classes: int
    sizes: Mapping[str, int]  # official number of examples per split
    files: Tuple[RawFile, ...]
    decoder: Decoder
    # torchvision's folder under data.root holding `files` ("" = data.root itself)
    subdir: str = ""
    # a fixed folder instead of data.root/subdir (digits: scikit-learn's bundled data)
    fixed_folder: Optional[Path] = None
    # archive in data.root that torchvision downloads and extracts into subdir: (file name, md5)
    archive: Optional[Tuple[str, Optional[str]]] = None
    # constructor arguments selecting each split
    split_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layout: str = "NCHW"  # layout of the class's `.data`: NHW, NHWC or NCHW
    labels_attr: str = "targets"
    # class attributes that stop torchvision from hashing files again (we check them ourselves)
    no_rehash: Mapping[str, Any] = field(default_factory=dict)
    homepage: str = ""
    extra_hint: str = ""  # an additional way to get the files, shown in the missing-files message

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def file_names(self) -> List[str]:
        return [f.display_name for f in self.files]


def _decode_torchvision(spec: DatasetSpec, found: Dict[str, Path], stage: Path) -> Decoded:
    """Decode both splits with the torchvision class from a staged copy of torchvision's layout.

    The stage holds links to the located files (gzipped IDX files are decompressed into it), so the
    class reads from data.root and from a flat raw_dir alike, and nothing is written next to the
    user's files.
    """
    folder = stage / spec.subdir
    folder.mkdir(parents=True, exist_ok=True)
    for raw in spec.files:
        source = found[raw.name]
        target = folder / raw.name
        if source.name.endswith(".gz") and not raw.name.endswith(".gz"):
            _gunzip(source, target)
        else:
            try:
                os.symlink(source, target)
            except OSError:
                shutil.copyfile(source, target)
    cls = spec.tv_class
    assert cls is not None
    if spec.no_rehash:
        cls = type(cls.__name__, (cls,), dict(spec.no_rehash))
    decoded: Decoded = {}
    for split in SPLITS:
        try:
            dataset = cls(str(stage), download=False, **spec.split_kwargs[split])
            images = _to_nchw(dataset.data, spec.layout)
            labels = torch.as_tensor(np.asarray(getattr(dataset, spec.labels_attr)), dtype=torch.int64)
        except Exception as exc:  # torchvision raises RuntimeError, ValueError, pickle errors, ...
            names = ", ".join(str(found[f.name]) for f in spec.files)
            raise DataError(
                f"could not decode the {split} split of {spec.name} ({type(exc).__name__}: {exc}). "
                f"One of these files is probably truncated or corrupt: {names}. "
                f"Delete it and fetch it again (`popgrad data prepare {spec.name}` or data.download=true)."
            ) from exc
        decoded[split] = (images, labels)
    return decoded


def digits_test_indices(labels: np.ndarray) -> np.ndarray:
    """The fixed digits test split: per class, round(20 %) of its examples, drawn with DIGITS_SPLIT_SEED.

    Drawn with numpy's legacy RandomState, whose stream numpy keeps frozen, so the split is the same
    on every machine and every numpy/scikit-learn version (359 test, 1438 training images).
    """
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(np.floor(DIGITS_TEST_FRACTION * len(members) + 0.5))
        picked.append(rng.permutation(members)[:n_test])
    return np.sort(np.concatenate(picked))


def _decode_sklearn_digits(spec: DatasetSpec, found: Dict[str, Path], stage: Path) -> Decoded:
    from sklearn.datasets import load_digits

    try:
        bunch = load_digits()
    except Exception as exc:
        raise DataError(f"could not read scikit-learn's bundled digits data ({exc}); reinstall scikit-learn") from exc
    # Pixel values 0..16 mapped to uint8 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    # Fixed stratified 80/20 split (no official split exists); see DIGITS_SPLIT_SEED.
    test_idx = digits_test_indices(labels)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    decoded: Decoded = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        decoded[split] = (torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy()))
    return decoded


def _cifar_no_rehash(cls: type) -> Dict[str, Any]:
    return {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    }


# MD5 checksums of the *decompressed* official MNIST and Fashion-MNIST IDX files. torchvision only
# knows the checksums of the .gz files as downloaded; these let us also verify uncompressed files and
# .gz files recompressed by someone else (Debian's dataset-fashion-mnist package recompresses them, so
# its .gz checksums differ from torchvision's while the decompressed content matches these values).
# They are the widely published md5sum values of the gunzipped official files (e.g. 47040016 bytes for
# MNIST's train-images-idx3-ubyte).
_IDX_CONTENT_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


def _idx_files(name: str, cls: type) -> Tuple[RawFile, ...]:
    gz_md5 = dict(cls.resources)
    return tuple(
        RawFile(base, _IDX_CONTENT_MD5[name][base], gz_md5[base + ".gz"])
        for base in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )


def _idx_spec(name: str, title: str, cls: type, homepage: str, extra_hint: str = "") -> DatasetSpec:
    return DatasetSpec(
        name=name,
        title=title,
        tv_class=cls,
        channels=1,
        image_size=28,
        num_classes=10,
        sizes={"train": 60000, "test": 10000},
        files=_idx_files(name, cls),
        decoder=_decode_torchvision,
        subdir=f"{cls.__name__}/raw",
        split_kwargs={"train": {"train": True}, "test": {"train": False}},
        layout="NHW",
        labels_attr="targets",
        homepage=homepage,
        extra_hint=extra_hint,
    )


def _cifar_spec(name: str, title: str, cls: type, num_classes: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        title=title,
        tv_class=cls,
        channels=3,
        image_size=32,
        num_classes=num_classes,
        sizes={"train": 50000, "test": 10000},
        files=tuple(RawFile(n, m) for n, m in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]),
        decoder=_decode_torchvision,
        subdir=cls.base_folder,
        archive=(cls.filename, cls.tgz_md5),
        split_kwargs={"train": {"train": True}, "test": {"train": False}},
        layout="NHWC",
        labels_attr="targets",
        no_rehash=_cifar_no_rehash(cls),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    )


def _svhn_spec() -> DatasetSpec:
    cls = tv_datasets.SVHN
    split_list = cls.split_list
    return DatasetSpec(
        name="svhn",
        title="SVHN (cropped digits)",
        tv_class=cls,
        channels=3,
        image_size=32,
        num_classes=10,
        sizes={"train": 73257, "test": 26032},
        files=tuple(RawFile(split_list[s][1], split_list[s][2]) for s in SPLITS),
        decoder=_decode_torchvision,
        subdir="",  # torchvision keeps the .mat files directly in data.root
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}},
        layout="NCHW",
        labels_attr="labels",
        no_rehash={"split_list": {k: [v[0], v[1], None] for k, v in split_list.items()}},
        homepage="http://ufldl.stanford.edu/housenumbers/",
    )


def _stl10_spec() -> DatasetSpec:
    cls = tv_datasets.STL10
    train = dict(cls.train_list)
    test = dict(cls.test_list)
    wanted = [("train_X.bin", train), ("train_y.bin", train), ("test_X.bin", test), ("test_y.bin", test)]
    return DatasetSpec(
        name="stl10",
        title="STL-10 (labelled train and test splits)",
        tv_class=cls,
        channels=3,
        image_size=96,
        num_classes=10,
        sizes={"train": 5000, "test": 8000},
        files=tuple(RawFile(n, table[n]) for n, table in wanted),
        decoder=_decode_torchvision,
        subdir=cls.base_folder,
        archive=(cls.filename, cls.tgz_md5),
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}},
        layout="NCHW",
        labels_attr="labels",
        # The unlabelled images (unlabeled_X.bin, 2.6 GB) are not used: only the labelled splits are listed.
        no_rehash={
            "train_list": [["train_X.bin", None], ["train_y.bin", None]],
            "test_list": [["test_X.bin", None], ["test_y.bin", None]],
        },
        homepage="https://cs.stanford.edu/~acoates/stl10/",
    )


def _digits_spec() -> DatasetSpec:
    import sklearn.datasets

    return DatasetSpec(
        name="digits",
        title="scikit-learn digits (8x8)",
        tv_class=None,
        channels=1,
        image_size=8,
        num_classes=10,
        sizes={"train": 1438, "test": 359},
        files=(RawFile("digits.csv.gz", None),),
        decoder=_decode_sklearn_digits,
        fixed_folder=Path(sklearn.datasets.__file__).parent / "data",
        homepage="bundled with scikit-learn",
    )


DATASET_SPECS: Dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _digits_spec(),
        _idx_spec("mnist", "MNIST", tv_datasets.MNIST, "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        _idx_spec(
            "fashion_mnist",
            "Fashion-MNIST",
            tv_datasets.FashionMNIST,
            "https://github.com/zalandoresearch/fashion-mnist",
            extra_hint=(
                "on Debian/Ubuntu: `apt-get install dataset-fashion-mnist`, then add "
                "dataset.raw_dir=/usr/share/datasets/fashion-mnist to the command"
            ),
        ),
        _cifar_spec("cifar10", "CIFAR-10", tv_datasets.CIFAR10, 10),
        _cifar_spec("cifar100", "CIFAR-100", tv_datasets.CIFAR100, 100),
        _svhn_spec(),
        _stl10_spec(),
    )
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASET_SPECS[name]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_SPECS)}") from None


# ----------------------------------------------------------------------------------------------------
# Paths, locking, atomic writes
# ----------------------------------------------------------------------------------------------------


def default_root() -> Path:
    """$POPGRAD_DATA, else ~/.cache/popgrad (the same default as data.root in conf/config.yaml)."""
    return resolve_root(os.environ.get("POPGRAD_DATA") or "~/.cache/popgrad")


def resolve_root(root: Union[str, Path]) -> Path:
    """data.root with `~` expanded, made absolute."""
    if root is None or str(root).strip() == "":
        raise DataError("data.root is empty; set it, e.g. `popgrad train data.root=~/datasets`, or set POPGRAD_DATA")
    return Path(os.path.expanduser(str(root))).resolve()


@dataclass(frozen=True)
class _Source:
    folder: Path  # where the raw files are looked for
    root: Path  # data.root
    raw_dir: Optional[Path]
    cache_dir: Path


def _resolve_source(spec: DatasetSpec, root: Path, raw_dir: Optional[Union[str, Path]]) -> _Source:
    cache_base = root / CACHE_DIRNAME
    if raw_dir is not None and str(raw_dir).strip() != "":
        if spec.fixed_folder is not None:
            raise DataError(
                f"dataset.raw_dir is not used by {spec.name} ({spec.homepage}); remove dataset.raw_dir={raw_dir}"
            )
        raw = Path(os.path.expanduser(str(raw_dir))).resolve()
        digest = hashlib.sha256(str(raw).encode()).hexdigest()[:10]
        return _Source(raw, root, raw, cache_base / f"{spec.name}-rawdir-{digest}")
    folder = spec.fixed_folder if spec.fixed_folder is not None else root / spec.subdir
    return _Source(folder, root, None, cache_base / spec.name)


def cache_dir_for(name: str, root: Union[str, Path], raw_dir: Optional[Union[str, Path]] = None) -> Path:
    """The cache folder of a data set read from data.root (or from raw_dir)."""
    return _resolve_source(get_spec(name), resolve_root(root), raw_dir).cache_dir


def _cache_files(cache_dir: Path) -> Dict[str, Path]:
    return {split: cache_dir / f"{split}.pt" for split in SPLITS}


def _cache_complete(cache_dir: Path) -> bool:
    return all(p.is_file() for p in _cache_files(cache_dir).values())


def _unwritable(folder: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot write the data cache in {folder} ({exc.strerror or exc}). Point data.root (or the "
        f"environment variable POPGRAD_DATA) at a writable folder, e.g. `popgrad train data.root=~/datasets`."
    )


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive flock on `<cache_dir>/.lock` (held while downloading, decoding and writing)."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _unwritable(cache_dir, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the data cache in %s", cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale(cache_dir: Path) -> None:
    """Delete temporary files and stages left by a killed build (call with the lock held)."""
    for path in cache_dir.iterdir():
        if path.name.startswith(".stage-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                path.unlink()


def _atomic_save(objs: Mapping[Path, Any]) -> None:
    """torch.save each object to a temporary file next to its target, then rename all into place.

    Nothing is renamed unless every file was written, and temporary files are removed on failure.
    """
    temps: Dict[Path, Path] = {}
    try:
        for target, obj in objs.items():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            temps[target] = tmp
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # honours the umask
            with os.fdopen(fd, "wb") as fh:
                torch.save(obj, fh)
                fh.flush()
                os.fsync(fh.fileno())
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except OSError as exc:
        raise _unwritable(next(iter(objs)).parent, exc) from exc
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    with contextlib.suppress(OSError):  # make the renames durable
        dir_fd = os.open(next(iter(objs)).parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ----------------------------------------------------------------------------------------------------
# Locating, verifying and fetching raw files
# ----------------------------------------------------------------------------------------------------


def _locate(spec: DatasetSpec, folder: Path) -> Tuple[Dict[str, Path], List[RawFile]]:
    """Map each needed file to its path in `folder` (IDX files: uncompressed or .gz); list the missing."""
    found: Dict[str, Path] = {}
    missing: List[RawFile] = []
    for raw in spec.files:
        candidates = [folder / raw.name] + ([folder / (raw.name + ".gz")] if raw.gzip_ok else [])
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(raw)
        else:
            found[raw.name] = path
    return found, missing


def _archive_path(spec: DatasetSpec, source: _Source) -> Optional[Path]:
    if spec.archive is None or source.raw_dir is not None:
        return None
    return source.root / spec.archive[0]


def _refetch_hint(spec: DatasetSpec) -> str:
    return (
        f"Delete it and fetch it again: `popgrad data prepare {spec.name}` on a machine with internet access, "
        f"data.download=true, or a fresh copy of the file."
    )


def _md5_of_gzip_content(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_file(spec: DatasetSpec, raw: RawFile, path: Path) -> None:
    """Raise DataError unless `path` matches the known checksum of `raw` (no-op when none is known)."""
    if path.name.endswith(".gz") and raw.gzip_ok:
        if calculate_md5(path) == raw.gz_md5:
            return
        if raw.md5 is None:
            return
        try:
            actual = _md5_of_gzip_content(path)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is truncated or corrupt ({exc}). {_refetch_hint(spec)}") from exc
        if actual != raw.md5:
            raise DataError(
                f"{path} is corrupt or not the official file: neither its MD5 nor that of its decompressed "
                f"content matches the official checksum (.gz {raw.gz_md5}, content {raw.md5}). "
                f"{_refetch_hint(spec)}"
            )
        return
    if raw.md5 is None:
        return
    try:
        actual = calculate_md5(path)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}).") from exc
    if actual != raw.md5:
        raise DataError(
            f"{path} is corrupt or not the official file: its MD5 is {actual}, expected {raw.md5}. "
            f"{_refetch_hint(spec)}"
        )


def _gunzip(source: Path, target: Path) -> None:
    try:
        with gzip.open(source, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{source} is truncated or corrupt ({exc}). Delete it and fetch it again.") from exc


def _missing_error(
    spec: DatasetSpec, source: _Source, missing: Sequence[RawFile], download_error: Optional[BaseException] = None
) -> DataError:
    folder = source.folder
    lines = [f"data set {spec.name!r} ({spec.title}) is not available: files missing from {folder}"]
    if source.raw_dir is not None:
        lines[0] += " (dataset.raw_dir)"
    lines[0] += ":"
    lines += [f"    {raw.display_name}" for raw in missing]
    if len(missing) < len(spec.files):
        lines.append(f"  (all files expected in {folder}: {', '.join(spec.file_names)})")
    if any(raw.gzip_ok for raw in spec.files):
        lines.append("  (each gzipped as listed or already decompressed without the .gz suffix)")
    archive = _archive_path(spec, source)
    if archive is not None:
        lines.append(f"  (or the archive {archive.name} in {source.root}, which is extracted automatically)")
    if download_error is not None:
        lines.append(f"  Downloading them failed: {type(download_error).__name__}: {download_error}")
    lines.append("  To get them, any of:")
    if source.raw_dir is None:
        lines.append(
            f"  - run `popgrad data prepare {spec.name}` on a machine with internet access and copy "
            f"{folder} to this machine (same place under data.root)"
        )
        if download_error is None:
            lines.append(f"  - rerun with data.download=true to download them into {source.root}")
        lines.append(f"  - copy the files into {folder} yourself (source: {spec.homepage})")
    else:
        lines.append(f"  - copy the files into {folder} (source: {spec.homepage})")
        lines.append(
            f"  - or remove dataset.raw_dir to read {spec.name} from data.root ({source.root / spec.subdir}), "
            f"which `popgrad data prepare {spec.name}` and data.download=true fill"
        )
    if spec.extra_hint:
        lines.append(f"  - {spec.extra_hint}")
    return DataError("\n".join(lines))


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(spec: DatasetSpec, source: _Source) -> None:
    """Let the torchvision class download into data.root; remove what a failed attempt left behind."""
    assert spec.tv_class is not None
    candidates = [source.folder / f.name for f in spec.files]
    candidates += [source.folder / (f.name + ".gz") for f in spec.files if f.gzip_ok]
    archive = _archive_path(spec, source)
    if archive is not None:
        candidates.append(archive)
    existed = {p for p in candidates if p.exists()}
    log.info("downloading %s into %s", spec.name, source.root)
    try:
        source.root.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            for split in SPLITS:  # SVHN downloads one file per split
                spec.tv_class(str(source.root), download=True, **spec.split_kwargs[split])
    except Exception as exc:
        for path in candidates:
            if path not in existed and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
        raise _missing_error(spec, source, _locate(spec, source.folder)[1] or spec.files, exc) from exc


def _extract(spec: DatasetSpec, archive: Path, source: _Source, verify: bool) -> None:
    assert spec.archive is not None
    if verify and spec.archive[1] is not None:
        actual = calculate_md5(archive)
        if actual != spec.archive[1]:
            raise DataError(
                f"{archive} is corrupt or not the official file: its MD5 is {actual}, expected {spec.archive[1]}. "
                f"{_refetch_hint(spec)}"
            )
    log.info("extracting %s into %s", archive, source.root)
    try:
        extract_archive(str(archive), str(source.root))
    except Exception as exc:
        raise DataError(f"could not extract {archive} ({exc}). {_refetch_hint(spec)}") from exc


# ----------------------------------------------------------------------------------------------------
# Building and reading the cache
# ----------------------------------------------------------------------------------------------------


def _to_nchw(data: Any, layout: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    if layout == "NHW":
        tensor = tensor.unsqueeze(1)
    elif layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.contiguous()


def _check_decoded(spec: DatasetSpec, decoded: Decoded, source: _Source, check_sizes: bool) -> None:
    for split in SPLITS:
        images, labels = decoded[split]
        problem = None
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != spec.input_shape:
            problem = f"images {tuple(images.shape)} {images.dtype}, expected (N, {', '.join(map(str, spec.input_shape))}) uint8"
        elif labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            problem = f"{labels.shape[0]} labels for {images.shape[0]} images"
        elif labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
            problem = f"labels outside 0..{spec.num_classes - 1}"
        elif check_sizes and images.shape[0] != spec.sizes[split]:
            problem = f"{images.shape[0]} examples, expected {spec.sizes[split]}"
        if problem:
            raise DataError(
                f"the {split} split of {spec.name} decoded from {source.folder} is wrong ({problem}). "
                f"The files are probably truncated or corrupt: delete them and fetch them again "
                f"(`popgrad data prepare {spec.name}` or data.download=true)."
            )


def _ensure_cache(
    spec: DatasetSpec,
    root: Path,
    raw_dir: Optional[Union[str, Path]] = None,
    download: bool = False,
    verify_checksums: Optional[bool] = None,
    force: bool = False,
) -> bool:
    """Make sure the cache of `spec` exists; return True when this call built it."""
    verify = _VERIFY_CHECKSUMS if verify_checksums is None else verify_checksums
    source = _resolve_source(spec, root, raw_dir)
    if not force and _cache_complete(source.cache_dir):
        return False
    found, missing = _locate(spec, source.folder)
    archive = _archive_path(spec, source)
    can_fetch = (archive is not None and archive.is_file()) or (download and source.raw_dir is None)
    if missing and not can_fetch:
        # Reported before anything is created under data.root.
        raise _missing_error(spec, source, missing)

    with _cache_lock(source.cache_dir):
        if not force and _cache_complete(source.cache_dir):
            return False  # another process built it while we waited
        _remove_stale(source.cache_dir)
        found, missing = _locate(spec, source.folder)
        if missing:
            if archive is not None and archive.is_file():
                _extract(spec, archive, source, verify)
            elif download and source.raw_dir is None:
                _download(spec, source)
            found, missing = _locate(spec, source.folder)
            if missing:
                raise _missing_error(spec, source, missing)
        if verify:
            for raw in spec.files:
                _verify_file(spec, raw, found[raw.name])
        log.info("decoding %s from %s into %s (once)", spec.name, source.folder, source.cache_dir)
        try:
            stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=source.cache_dir))
        except OSError as exc:
            raise _unwritable(source.cache_dir, exc) from exc
        try:
            decoded = spec.decoder(spec, found, stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        _check_decoded(spec, decoded, source, check_sizes=verify)
        files = _cache_files(source.cache_dir)
        _atomic_save(
            {
                files[split]: {
                    "format_version": CACHE_FORMAT_VERSION,
                    "dataset": spec.name,
                    "split": split,
                    "source": str(source.folder),
                    "images": decoded[split][0].contiguous(),
                    "labels": decoded[split][1].to(torch.int64).contiguous(),
                }
                for split in SPLITS
            }
        )
    return True


def _read_cache_file(spec: DatasetSpec, path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = obj["images"], obj["labels"]
        ok = (
            obj.get("format_version") == CACHE_FORMAT_VERSION
            and obj.get("dataset") == spec.name
            and isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and tuple(images.shape[1:]) == spec.input_shape
            and isinstance(labels, torch.Tensor)
            and labels.dtype == torch.int64
            and labels.shape == images.shape[:1]
        )
    except Exception as exc:
        raise DataError(
            f"the cache file {path} is unreadable ({type(exc).__name__}: {exc}). Delete it; it is rebuilt "
            f"from the raw files on the next run (or with `popgrad data prepare {spec.name}`)."
        ) from exc
    if not ok:
        raise DataError(
            f"the cache file {path} does not hold the expected {spec.name} tensors (written by another "
            f"version?). Delete it; it is rebuilt from the raw files on the next run."
        )
    return images, labels


def _load_full(
    spec: DatasetSpec,
    root: Path,
    raw_dir: Optional[Union[str, Path]] = None,
    download: bool = False,
    verify_checksums: Optional[bool] = None,
) -> Decoded:
    """The official train and test splits (CPU tensors), building the cache first when needed."""
    _ensure_cache(spec, root, raw_dir, download, verify_checksums)
    files = _cache_files(_resolve_source(spec, root, raw_dir).cache_dir)
    return {split: _read_cache_file(spec, files[split]) for split in SPLITS}


# ----------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------


@dataclass
class DataSplits:
    """Whole splits as tensors on one device: images uint8 (N, C, H, W), labels int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, int, int]
    name: str
    source: str = ""  # folder the raw files were read from

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.train_labels)} train, {len(self.val_labels)} val, "
            f"{len(self.test_labels)} test, input {self.input_shape}, {self.num_classes} classes"
        )


def _check_normalisation(spec: DatasetSpec, dataset_cfg: Any) -> None:
    for key in ("mean", "std"):
        values = list(getattr(dataset_cfg, key))
        if len(values) not in (1, spec.channels):
            raise DataError(
                f"dataset.{key} has {len(values)} values but {spec.name} images have {spec.channels} "
                f"channel(s); give {spec.channels} values (or 1 for all channels), "
                f"e.g. dataset.{key}=[{', '.join(['0.5'] * spec.channels)}]"
            )


def _stratified_pick(
    indices: np.ndarray, labels: np.ndarray, size: int, seed: int, key: str, value: Any
) -> Tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (picked, rest) with len(picked) == size, stratified by `labels`."""
    from sklearn.model_selection import train_test_split

    if size >= len(indices):
        return np.sort(indices), np.empty(0, dtype=indices.dtype)
    classes, counts = np.unique(labels, return_counts=True)
    stratify = labels
    if size < len(classes) or len(indices) - size < len(classes) or counts.min() < 2:
        # Too few examples to give every class a share on both sides: plain seeded random split.
        log.warning("%s=%s is too small for a stratified split; using a plain random one", key, value)
        stratify = None
    try:
        picked, rest = train_test_split(indices, train_size=size, stratify=stratify, random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split with {key}={value}: {exc}") from exc
    return np.sort(picked), np.sort(rest)


def load_splits(dataset_cfg: Any, data_cfg: Any, seed: int, device: Union[str, torch.device] = "cpu") -> DataSplits:
    """Load train/val/test splits of `dataset_cfg.name` as tensors on `device`.

    The validation split is carved from the official training split (stratified, `dataset.val_fraction`,
    seeded by the run seed); `dataset.train_size` then subsamples the remaining training examples
    (stratified, seeded). A split too small to give every class a share (fewer examples than classes)
    falls back to a plain seeded random split. The test split is always the official one (digits: the
    fixed 80/20 split).
    """
    spec = get_spec(dataset_cfg.name)
    _check_normalisation(spec, dataset_cfg)
    root = resolve_root(data_cfg.root)
    raw_dir = getattr(dataset_cfg, "raw_dir", None)
    full = _load_full(spec, root, raw_dir, download=bool(data_cfg.download))
    train_images, train_labels = full["train"]
    test_images, test_labels = full["test"]

    random_state = int(seed) % (2**32)
    labels_np = train_labels.numpy()
    all_idx = np.arange(len(labels_np))
    val_fraction = float(dataset_cfg.val_fraction)
    if val_fraction > 0:
        n_val = int(np.ceil(val_fraction * len(all_idx)))
        if n_val >= len(all_idx):
            raise DataError(
                f"dataset.val_fraction={val_fraction} leaves no training examples out of {len(all_idx)} "
                f"for {spec.name}; use a smaller value"
            )
        val_idx, train_idx = _stratified_pick(
            all_idx, labels_np, n_val, random_state, "dataset.val_fraction", val_fraction
        )
    else:
        val_idx, train_idx = np.empty(0, dtype=np.int64), all_idx

    train_size = getattr(dataset_cfg, "train_size", None)
    if train_size is not None:
        train_size = int(train_size)
        if train_size > len(train_idx):
            raise DataError(
                f"dataset.train_size={train_size} is larger than the {len(train_idx)} training examples "
                f"available for {spec.name} (after holding out dataset.val_fraction={val_fraction} for "
                f"validation); use at most dataset.train_size={len(train_idx)}"
            )
        if train_size < 1:
            raise DataError(f"dataset.train_size={train_size} must be null or an integer >= 1")
        train_idx, _ = _stratified_pick(
            train_idx, labels_np[train_idx], train_size, random_state, "dataset.train_size", train_size
        )

    def take(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(idx.astype(np.int64))
        return images.index_select(0, index).to(device), labels.index_select(0, index).to(device)

    tr_x, tr_y = take(train_images, train_labels, train_idx)
    va_x, va_y = take(train_images, train_labels, val_idx)
    return DataSplits(
        train_images=tr_x,
        train_labels=tr_y,
        val_images=va_x,
        val_labels=va_y,
        test_images=test_images.to(device),
        test_labels=test_labels.to(device),
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        name=spec.name,
        source=str(_resolve_source(spec, root, raw_dir).folder),
    )


# ----------------------------------------------------------------------------------------------------
# Batch transform (on the device, vectorised)
# ----------------------------------------------------------------------------------------------------


class BatchTransform:
    """uint8 batch (N, C, H, W) on any device -> normalised float batch, augmented when `train=True`.

    Augmentation (training only): random crop with zero padding `crop_padding` (a per-sample offset,
    like torchvision's RandomCrop(size, padding)) and a random horizontal flip per sample (p = 0.5).
    Both are done with tensor indexing on the batch's device, without a loop over samples. Random
    numbers come from `generator` when given (on its own device, so a CPU generator gives the same
    augmentation for CPU and CUDA batches), else from torch's default generator of the batch's device.
    Normalisation: (pixel / 255 - mean) / std per channel, computed in float32 (float64 when asked),
    returned as `dtype` (float32 by default).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != len(self.std) or not self.mean:
            raise DataError(f"dataset.mean ({len(self.mean)} values) and dataset.std ({len(self.std)}) must have the same, non-zero length")
        if any(s <= 0 for s in self.std):
            raise DataError(f"dataset.std must be > 0, got {self.std}")
        if int(crop_padding) < 0:
            raise DataError(f"dataset.crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.dtype = dtype
        self._affine: Dict[Tuple[str, torch.dtype, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, dataset_cfg: Any, dtype: torch.dtype = torch.float32) -> "BatchTransform":
        return cls(dataset_cfg.mean, dataset_cfg.std, dataset_cfg.crop_padding, dataset_cfg.horizontal_flip, dtype)

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip

    def __repr__(self) -> str:
        return (
            f"BatchTransform(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
            f"horizontal_flip={self.horizontal_flip}, dtype={self.dtype})"
        )

    def _scale_shift(self, device: torch.device, dtype: torch.dtype, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype, channels)
        if key not in self._affine:
            if len(self.mean) not in (1, channels):
                raise DataError(
                    f"dataset.mean/std have {len(self.mean)} values but the images have {channels} channel(s)"
                )
            mean = torch.tensor(self.mean, dtype=torch.float64).expand(channels)
            std = torch.tensor(self.std, dtype=torch.float64).expand(channels)
            scale = (1.0 / (255.0 * std)).to(device=device, dtype=dtype).view(1, channels, 1, 1)
            shift = (-mean / std).to(device=device, dtype=dtype).view(1, channels, 1, 1)
            self._affine[key] = (scale, shift)
        return self._affine[key]

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random crop and flip of a uint8 (or any dtype) batch; same shape and dtype out."""
        n, _, h, w = images.shape
        device = images.device
        rng_device = generator.device if generator is not None else device
        pad = self.crop_padding
        if pad > 0:
            offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=rng_device).to(device)
            padded = F.pad(images, (pad, pad, pad, pad))  # zeros, like torchvision's RandomCrop(padding=p)
            rows = offsets[0].view(n, 1, 1) + torch.arange(h, device=device).view(1, h, 1)
            cols = offsets[1].view(n, 1, 1) + torch.arange(w, device=device).view(1, 1, w)
            batch = torch.arange(n, device=device).view(n, 1, 1)
            # Advanced indexing on (N, H, W) of the channels-last view -> (N, H, W, C).
            images = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
        if self.horizontal_flip:
            flip = torch.rand(n, generator=generator, device=rng_device).to(device) < 0.5
            images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
        return images

    def __call__(
        self,
        images: torch.Tensor,
        train: bool,
        generator: Optional[torch.Generator] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        out_dtype = dtype or self.dtype
        if train and self.augments:
            images = self.augment(images, generator)
        compute = torch.float64 if out_dtype == torch.float64 else torch.float32
        scale, shift = self._scale_shift(images.device, compute, images.shape[1])
        out = torch.addcmul(shift, images.to(compute), scale)
        return out if out.dtype == out_dtype else out.to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# Data commands (`popgrad data list`, `popgrad data prepare`)
# ----------------------------------------------------------------------------------------------------


def list_datasets(root: Union[str, Path]) -> List[Dict[str, Any]]:
    """One dict per data set: name, title, files_present (alias raw_present), cache_present, folder,
    cache_folder, files (expected names) and source (where to get them)."""
    resolved = resolve_root(root)
    rows = []
    for spec in DATASET_SPECS.values():
        source = _resolve_source(spec, resolved, None)
        _, missing = _locate(spec, source.folder)
        archive = _archive_path(spec, source)
        present = not missing or (archive is not None and archive.is_file())
        rows.append(
            {
                "name": spec.name,
                "title": spec.title,
                "files_present": present,
                "raw_present": present,
                "cache_present": _cache_complete(source.cache_dir),
                "folder": str(source.folder),
                "cache_folder": str(source.cache_dir),
                "files": spec.file_names,
                "source": spec.homepage,
            }
        )
    return rows


def prepare_datasets(
    names: Sequence[str],
    root: Union[str, Path],
    download: bool = True,
    force: bool = False,
    raw_dir: Optional[Union[str, Path]] = None,
) -> None:
    """Download (when allowed), verify and cache each named data set under `root`.

    Safe while jobs read the cache (atomic replace under the lock). `force=True` rebuilds an existing
    cache from the raw files; `raw_dir` reads the files from that folder instead (one data set only).
    """
    specs = [get_spec(name) for name in names]  # unknown names fail before any work
    if raw_dir is not None and len(specs) != 1:
        raise DataError("dataset.raw_dir / --raw-dir applies to one data set at a time")
    resolved = resolve_root(root)
    for spec in specs:
        built = _ensure_cache(spec, resolved, raw_dir, download=download, verify_checksums=None, force=force)
        cache_dir = _resolve_source(spec, resolved, raw_dir).cache_dir
        log.info("%s: %s %s", spec.name, "cached in" if built else "already cached in", cache_dir)
