"""Tests of popgrad_cli.data: loading, splits, caching, checksums, offline errors and batch transforms.

No network: torchvision formats are exercised with tiny fake files from fake_data.py (checksum
verification switched off for those), and the only real data set needed is scikit-learn's bundled
digits. The Fashion-MNIST test uses Debian's dataset-fashion-mnist files when installed (required
when POPGRAD_REQUIRE_DATA=1).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import multiprocessing
import os
import re
import shutil
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import yaml

import fake_data
from popgrad_cli import data
from popgrad_cli.config import DATASET_NAMES, DataConfig, DatasetConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_SETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10"]


def dataset_cfg(name: str = "digits", **overrides) -> DatasetConfig:
    spec = data.DATASET_SPECS[name]
    values = dict(name=name, mean=[0.5] * spec.channels, std=[0.25] * spec.channels)
    values.update(overrides)
    return DatasetConfig(**values)


def data_cfg(root: Path, download: bool = False) -> DataConfig:
    return DataConfig(root=str(root), download=download)


@pytest.fixture
def no_checksums(monkeypatch):
    """Fake files cannot match the official MD5s."""
    monkeypatch.setattr(data, "_VERIFY_CHECKSUMS", False)


def row_counter(images: torch.Tensor) -> collections.Counter:
    return collections.Counter(bytes(row) for row in images.reshape(len(images), -1).numpy())


def leftover_files(cache_dir: Path) -> list:
    """Anything in a cache folder except the lock file."""
    if not cache_dir.exists():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if p.name != ".lock")


# ----------------------------------------------------------------------------------------------------
# digits (real data, bundled with scikit-learn)
# ----------------------------------------------------------------------------------------------------


def test_digits_shapes_and_types(tmp_path):
    splits = data.load_splits(dataset_cfg("digits"), data_cfg(tmp_path), seed=0, device="cpu")
    assert splits.name == "digits"
    assert splits.num_classes == 10
    assert splits.input_shape == (1, 8, 8)
    n_val = int(np.ceil(0.1 * 1438))
    assert splits.train_images.shape == (1438 - n_val, 1, 8, 8)
    assert splits.val_images.shape == (n_val, 1, 8, 8)
    assert splits.test_images.shape == (359, 1, 8, 8)
    for images in (splits.train_images, splits.val_images, splits.test_images):
        assert images.dtype == torch.uint8
    for labels in (splits.train_labels, splits.val_labels, splits.test_labels):
        assert labels.dtype == torch.int64
    assert int(splits.train_images.max()) == 255
    assert int(splits.train_images.min()) == 0
    assert set(splits.test_labels.tolist()) == set(range(10))
    assert (tmp_path / "popgrad-cache" / "digits" / "train.pt").is_file()


def test_digits_validation_split_is_stratified_and_disjoint(tmp_path):
    full = data._load_full(data.DATASET_SPECS["digits"], tmp_path)
    full_images, full_labels = full["train"]
    splits = data.load_splits(dataset_cfg("digits", val_fraction=0.2), data_cfg(tmp_path), seed=3)
    assert len(splits.val_labels) == int(np.ceil(0.2 * len(full_labels)))
    full_counts = torch.bincount(full_labels, minlength=10)
    val_counts = torch.bincount(splits.val_labels, minlength=10)
    assert torch.all((val_counts.double() - 0.2 * full_counts.double()).abs() <= 1.0)
    # train + val is exactly the official training split
    assert row_counter(torch.cat([splits.train_images, splits.val_images])) == row_counter(full_images)
    assert torch.equal(torch.sort(torch.cat([splits.train_labels, splits.val_labels])).values, torch.sort(full_labels).values)


def test_digits_split_is_seeded(tmp_path):
    cfg, dcfg = dataset_cfg("digits"), data_cfg(tmp_path)
    a = data.load_splits(cfg, dcfg, seed=1)
    b = data.load_splits(cfg, dcfg, seed=1)
    c = data.load_splits(cfg, dcfg, seed=2)
    assert torch.equal(a.val_images, b.val_images)
    assert torch.equal(a.train_labels, b.train_labels)
    assert not torch.equal(a.val_images, c.val_images)
    # the digits test split is fixed, independent of the run seed
    assert torch.equal(a.test_images, c.test_images)
    assert torch.equal(a.test_labels, c.test_labels)


def test_digits_test_split_is_fixed_forever():
    """A changed digits test split would silently change every digits result: pin it."""
    from sklearn.datasets import load_digits

    test_idx = data.digits_test_indices(load_digits().target)
    assert test_idx[:8].tolist() == [3, 7, 13, 19, 36, 38, 43, 48]
    assert hashlib.sha256(test_idx.astype("<i8").tobytes()).hexdigest()[:16] == "3530be80b9605f4c"


def test_stale_temporary_files_are_cleaned(tmp_path):
    cache_dir = tmp_path / "popgrad-cache" / "digits"
    (cache_dir / ".stage-killed").mkdir(parents=True)
    (cache_dir / ".train.pt.123.abcd.tmp").write_bytes(b"partial")
    data.load_splits(dataset_cfg("digits"), data_cfg(tmp_path), seed=0)
    assert leftover_files(cache_dir) == ["test.pt", "train.pt"]


def test_digits_train_size_subsample(tmp_path):
    dcfg = data_cfg(tmp_path)
    splits = data.load_splits(dataset_cfg("digits", train_size=500), dcfg, seed=0)
    assert splits.train_images.shape == (500, 1, 8, 8)
    counts = torch.bincount(splits.train_labels, minlength=10)
    assert int(counts.min()) >= 48
    assert int(counts.max()) <= 52  # stratified: about 50 per class
    again = data.load_splits(dataset_cfg("digits", train_size=500), dcfg, seed=0)
    assert torch.equal(splits.train_images, again.train_images)
    other = data.load_splits(dataset_cfg("digits", train_size=500), dcfg, seed=1)
    assert not torch.equal(splits.train_images, other.train_images)
    # the validation split does not depend on train_size
    full = data.load_splits(dataset_cfg("digits"), dcfg, seed=0)
    assert torch.equal(full.val_images, splits.val_images)
    # fewer examples than classes: plain seeded subsample
    tiny = data.load_splits(dataset_cfg("digits", train_size=5), dcfg, seed=0)
    assert tiny.train_images.shape[0] == 5


def test_train_size_larger_than_available_is_an_error(tmp_path):
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg("digits", train_size=5000), data_cfg(tmp_path), seed=0)
    message = str(info.value)
    assert "dataset.train_size=5000" in message
    assert "1294" in message
    assert "digits" in message


def test_val_fraction_zero_gives_empty_split(tmp_path):
    splits = data.load_splits(dataset_cfg("digits", val_fraction=0.0), data_cfg(tmp_path), seed=0)
    assert splits.train_images.shape == (1438, 1, 8, 8)
    assert splits.val_images.shape == (0, 1, 8, 8)
    assert splits.val_images.dtype == torch.uint8
    assert splits.val_labels.shape == (0,)
    assert splits.val_labels.dtype == torch.int64


def test_digits_yaml_normalisation_matches_the_data(tmp_path):
    cfg = yaml.safe_load((CONF_DIR / "digits.yaml").read_text())
    images = data._load_full(data.DATASET_SPECS["digits"], tmp_path)["train"][0].double() / 255
    assert images.mean().item() == pytest.approx(cfg["mean"][0], abs=1e-3)
    assert images.std().item() == pytest.approx(cfg["std"][0], abs=1e-3)


def test_unknown_name_and_bad_mean_length(tmp_path):
    with pytest.raises(data.DataError, match="valid names: digits, mnist"):
        data.load_splits(DatasetConfig(name="imagenet"), data_cfg(tmp_path), seed=0)
    with pytest.raises(data.DataError, match="dataset.mean has 2 values"):
        data.load_splits(dataset_cfg("digits", mean=[0.5, 0.5], std=[0.2, 0.2]), data_cfg(tmp_path), seed=0)


def test_root_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.resolve_root("~/datasets") == (tmp_path / "datasets").resolve()
    assert data.resolve_root("relative").is_absolute()
    monkeypatch.delenv("POPGRAD_DATA", raising=False)
    assert data.default_root() == (tmp_path / ".cache" / "popgrad").resolve()
    monkeypatch.setenv("POPGRAD_DATA", str(tmp_path / "shared"))
    assert data.default_root() == (tmp_path / "shared").resolve()


def test_device_placement(tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = data.load_splits(dataset_cfg("digits"), data_cfg(tmp_path), seed=0, device=device)
    for tensor in (splits.train_images, splits.val_labels, splits.test_images):
        assert tensor.device.type == device


# ----------------------------------------------------------------------------------------------------
# torchvision formats, from fake files
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_fake_files_load_through_torchvision(name, tmp_path, no_checksums):
    written = fake_data.write_fake(name, tmp_path)
    spec = data.DATASET_SPECS[name]
    full = data._load_full(spec, tmp_path)
    for split in ("train", "test"):
        images, labels = full[split]
        assert images.dtype == torch.uint8
        assert labels.dtype == torch.int64
        assert tuple(images.shape[1:]) == spec.input_shape
        assert torch.equal(images, torch.from_numpy(written[split][0]))
        assert torch.equal(labels, torch.from_numpy(written[split][1]))
    splits = data.load_splits(dataset_cfg(name, val_fraction=0.25), data_cfg(tmp_path), seed=0)
    assert splits.input_shape == spec.input_shape
    assert splits.num_classes == spec.num_classes
    n_train = len(written["train"][1])
    assert len(splits.val_labels) == int(np.ceil(0.25 * n_train))
    assert len(splits.train_labels) + len(splits.val_labels) == n_train
    assert sorted(p.name for p in (tmp_path / "popgrad-cache" / name).iterdir()) == [".lock", "test.pt", "train.pt"]


def test_mnist_uncompressed_files_load(tmp_path, no_checksums):
    written = fake_data.write_fake_mnist(tmp_path, gz=False)
    full = data._load_full(data.DATASET_SPECS["mnist"], tmp_path)
    assert torch.equal(full["test"][0], torch.from_numpy(written["test"][0]))


def test_raw_dir_is_read_and_cached_separately(tmp_path, no_checksums):
    raw = tmp_path / "flat"
    root = tmp_path / "root"
    from_raw = fake_data.write_fake_idx_folder(raw, seed=1)
    from_root = fake_data.write_fake_fashion_mnist(root, seed=2)
    via_raw = data.load_splits(dataset_cfg("fashion_mnist", raw_dir=str(raw)), data_cfg(root), seed=0)
    via_root = data.load_splits(dataset_cfg("fashion_mnist"), data_cfg(root), seed=0)
    assert torch.equal(via_raw.test_images.squeeze(1), torch.from_numpy(from_raw["test"][0][:, 0]))
    assert torch.equal(via_root.test_images.squeeze(1), torch.from_numpy(from_root["test"][0][:, 0]))
    caches = sorted(p.name for p in (root / "popgrad-cache").iterdir())
    assert caches[0] == "fashion_mnist"
    assert re.fullmatch(r"fashion_mnist-rawdir-[0-9a-f]{10}", caches[1])
    assert data.cache_dir_for("fashion_mnist", root, raw) == root / "popgrad-cache" / caches[1]
    assert via_raw.source == str(raw.resolve())
    # nothing was written into raw_dir
    assert sorted(p.name for p in raw.iterdir()) == sorted(f + ".gz" for pair in fake_data.IDX_FILES.values() for f in pair)


def test_cifar_archive_is_extracted(tmp_path, no_checksums):
    written = fake_data.write_fake_cifar10(tmp_path / "build")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(tmp_path / "build")
    full = data._load_full(data.DATASET_SPECS["cifar10"], tmp_path)
    assert torch.equal(full["train"][1], torch.from_numpy(written["train"][1]))
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


# ----------------------------------------------------------------------------------------------------
# checksums and corrupt files
# ----------------------------------------------------------------------------------------------------


def test_checksums_are_verified_by_default():
    assert data._VERIFY_CHECKSUMS is True


@pytest.mark.parametrize("name", ["mnist", "cifar10", "svhn", "stl10"])
def test_file_with_wrong_md5_is_rejected(name, tmp_path):
    fake_data.write_fake(name, tmp_path)
    spec = data.DATASET_SPECS[name]
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg(name), data_cfg(tmp_path), seed=0)
    message = str(info.value)
    first = spec.files[0]
    assert str(tmp_path / spec.subdir / first.display_name) in message
    assert "Delete it and fetch it again" in message
    assert leftover_files(tmp_path / "popgrad-cache" / name) == []


def test_gz_accepted_by_content_checksum(tmp_path, monkeypatch):
    """A recompressed .gz (different file MD5) passes when its decompressed content matches."""
    fake_data.write_fake_mnist(tmp_path)
    spec = data.DATASET_SPECS["mnist"]
    folder = tmp_path / "MNIST" / "raw"
    content = {f.name: hashlib.md5(gzip.decompress((folder / f.display_name).read_bytes())).hexdigest() for f in spec.files}
    patched = dataclasses.replace(
        spec,
        files=tuple(data.RawFile(f.name, content[f.name], f.gz_md5) for f in spec.files),
        sizes={"train": 60, "test": 20},  # verified loads also check the number of examples
    )
    assert data._ensure_cache(patched, tmp_path, verify_checksums=True) is True
    # and a byte changed inside the content is caught
    images = folder / "t10k-images-idx3-ubyte.gz"
    fake_data.write_idx(images, np.zeros((20, 28, 28), np.uint8))
    with pytest.raises(data.DataError, match=re.escape(str(images))):
        data._ensure_cache(patched, tmp_path, verify_checksums=True, force=True)


def test_truncated_gz_is_rejected_without_leaving_a_cache(tmp_path, no_checksums):
    fake_data.write_fake_mnist(tmp_path)
    victim = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg("mnist"), data_cfg(tmp_path), seed=0)
    assert str(victim) in str(info.value)
    assert "truncated or corrupt" in str(info.value)
    assert leftover_files(tmp_path / "popgrad-cache" / "mnist") == []


def test_undecodable_file_is_a_data_error(tmp_path, no_checksums):
    fake_data.write_fake_cifar10(tmp_path)
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg("cifar10"), data_cfg(tmp_path), seed=0)
    assert str(victim) in str(info.value)
    assert "could not decode" in str(info.value)
    assert leftover_files(tmp_path / "popgrad-cache" / "cifar10") == []


def test_unreadable_cache_file_is_a_data_error(tmp_path):
    data.load_splits(dataset_cfg("digits"), data_cfg(tmp_path), seed=0)
    cache = tmp_path / "popgrad-cache" / "digits" / "test.pt"
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(data.DataError, match=re.escape(str(cache))):
        data.load_splits(dataset_cfg("digits"), data_cfg(tmp_path), seed=0)


# ----------------------------------------------------------------------------------------------------
# missing files, offline
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_missing_files_without_download(name, tmp_path):
    spec = data.DATASET_SPECS[name]
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg(name), data_cfg(tmp_path, download=False), seed=0)
    message = str(info.value)
    assert repr(name) in message
    assert str(tmp_path / spec.subdir) in message
    for file_name in spec.file_names:
        assert file_name in message
    assert f"popgrad data prepare {name}" in message and "data.download=true" in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message
        assert "dataset.raw_dir=/usr/share/datasets/fashion-mnist" in message
    assert list(tmp_path.iterdir()) == []  # nothing created, no cache folder


def test_missing_raw_dir_files(tmp_path):
    raw = tmp_path / "nowhere"
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg("fashion_mnist", raw_dir=str(raw)), data_cfg(tmp_path / "root"), seed=0)
    assert str(raw) in str(info.value) and "dataset.raw_dir" in str(info.value)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_failed_download_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import torchvision

    def offline_download(self):
        # simulate a transfer that breaks off after writing part of a file
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)
        (Path(self.raw_folder) / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline_download)
    with pytest.raises(data.DataError) as info:
        data.load_splits(dataset_cfg("mnist"), data_cfg(tmp_path, download=True), seed=0)
    message = str(info.value)
    assert "'mnist'" in message and "Temporary failure in name resolution" in message
    assert "train-images-idx3-ubyte.gz" in message and "popgrad data prepare mnist" in message
    assert not (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()
    assert leftover_files(tmp_path / "popgrad-cache" / "mnist") == []


def test_download_true_uses_the_torchvision_class(tmp_path, monkeypatch, no_checksums):
    import torchvision

    calls = []

    def fake_download(self):
        calls.append(self.root)
        if not (Path(self.raw_folder) / "t10k-images-idx3-ubyte.gz").exists():
            # like torchvision: the .gz files plus their decompressed copies
            fake_data.write_fake_mnist(self.root, gz=True)
            fake_data.write_fake_mnist(self.root, gz=False)

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    splits = data.load_splits(dataset_cfg("mnist"), data_cfg(tmp_path, download=True), seed=0)
    assert calls and all(Path(c) == tmp_path for c in calls)
    assert splits.test_images.shape == (20, 1, 28, 28)


# ----------------------------------------------------------------------------------------------------
# data commands
# ----------------------------------------------------------------------------------------------------


def test_list_datasets(tmp_path, no_checksums):
    fake_data.write_fake_cifar10(tmp_path)
    rows = {row["name"]: row for row in data.list_datasets(tmp_path)}
    assert list(rows) == list(DATASET_NAMES)
    assert rows["cifar10"]["files_present"] and not rows["cifar10"]["cache_present"]
    assert rows["cifar10"]["folder"] == str(tmp_path / "cifar-10-batches-py")
    assert not rows["svhn"]["files_present"]
    assert rows["digits"]["files_present"]
    data.prepare_datasets(["cifar10"], tmp_path, download=False)
    assert data.list_datasets(tmp_path)[list(rows).index("cifar10")]["cache_present"]


def test_prepare_datasets(tmp_path, no_checksums):
    with pytest.raises(data.DataError, match="valid names: digits, mnist, fashion_mnist"):
        data.prepare_datasets(["digits", "imagenet"], tmp_path)
    assert not (tmp_path / "popgrad-cache").exists()
    fake_data.write_fake_mnist(tmp_path)
    data.prepare_datasets(["digits", "mnist"], tmp_path, download=False)
    train = tmp_path / "popgrad-cache" / "mnist" / "train.pt"
    first = train.stat().st_mtime_ns
    data.prepare_datasets(["mnist"], tmp_path, download=False)
    assert train.stat().st_mtime_ns == first
    assert data._ensure_cache(data.DATASET_SPECS["mnist"], tmp_path, force=True) is True
    assert torch.load(train, weights_only=True)["images"].shape == (60, 1, 28, 28)
    with pytest.raises(data.DataError, match="not available"):
        data.prepare_datasets(["svhn"], tmp_path, download=False)


# ----------------------------------------------------------------------------------------------------
# concurrency
# ----------------------------------------------------------------------------------------------------


def _build_in_process(root: str, barrier, results) -> None:
    barrier.wait()
    spec = data.DATASET_SPECS["cifar10"]
    built = data._ensure_cache(spec, Path(root), verify_checksums=False)
    full = data._load_full(spec, Path(root), verify_checksums=False)
    digest = hashlib.sha256()
    for split in ("train", "test"):
        digest.update(full[split][0].numpy().tobytes())
        digest.update(full[split][1].numpy().tobytes())
    results.put((built, digest.hexdigest()))


def test_two_processes_build_the_same_cache(tmp_path):
    fake_data.write_fake_cifar10(tmp_path, n_per_batch=400)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for built, _ in outcomes) == [False, True]  # decoded exactly once
    assert outcomes[0][1] == outcomes[1][1]
    assert leftover_files(tmp_path / "popgrad-cache" / "cifar10") == ["test.pt", "train.pt"]
    loaded = data._load_full(data.DATASET_SPECS["cifar10"], tmp_path, verify_checksums=False)
    assert loaded["train"][0].shape == (2000, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------
# BatchTransform
# ----------------------------------------------------------------------------------------------------


def random_batch(n=64, c=3, h=8, w=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)


def test_normalisation_values():
    t = data.BatchTransform(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 0.1])
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    images[1] = 0
    out = t(images, train=False)
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected_white = torch.tensor([(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 0.1])
    expected_black = torch.tensor([-0.1 / 0.5, -0.2 / 0.25, -0.3 / 0.1])
    assert torch.allclose(out[0, :, 0, 0], expected_white, atol=1e-5)
    assert torch.allclose(out[1, :, 2, 3], expected_black, atol=1e-5)
    x = random_batch()
    reference = (x.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double()) / torch.tensor(
        [0.5, 0.25, 0.1]
    ).view(1, 3, 1, 1).double()
    assert torch.allclose(t(x, train=False).double(), reference, atol=1e-5)
    assert t(x, train=False, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert data.BatchTransform([0.5], [0.5], dtype=torch.float64)(x, train=False).dtype == torch.float64
    with pytest.raises(data.DataError, match="3 channel"):
        data.BatchTransform([0.5, 0.5], [0.5, 0.5])(x, train=False)


def test_from_config_and_no_augmentation_when_not_training():
    cfg = dataset_cfg("cifar10", crop_padding=4, horizontal_flip=True)
    t = data.BatchTransform.from_config(cfg)
    plain = data.BatchTransform(cfg.mean, cfg.std)
    x = random_batch()
    assert t.augments
    assert torch.equal(t(x, train=False), plain(x, train=False))
    assert not torch.equal(t(x, train=True, generator=torch.Generator().manual_seed(0)), plain(x, train=False))


def test_augmentation_is_deterministic_with_a_seeded_generator():
    t = data.BatchTransform([0.5] * 3, [0.5] * 3, crop_padding=2, horizontal_flip=True)
    x = random_batch()
    a = t(x, train=True, generator=torch.Generator().manual_seed(7))
    b = t(x, train=True, generator=torch.Generator().manual_seed(7))
    c = t(x, train=True, generator=torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_flip_flips_some_samples_and_keeps_others():
    t = data.BatchTransform([0.0] * 3, [1.0] * 3, crop_padding=0, horizontal_flip=True)
    x = random_batch(n=64)
    out = t.augment(x, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, s.flip(2)) for o, s in zip(out, x)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert torch.all(flipped | kept)
    assert 10 < int(flipped.sum()) < 54


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    pad = 2
    t = data.BatchTransform([0.0], [1.0], crop_padding=pad, horizontal_flip=False)
    x = random_batch(n=32, c=1, h=6, w=5, seed=1)
    out = t.augment(x, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"sample {i} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 5  # per-sample offsets, not one shift for the whole batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transform_on_cuda_matches_cpu_with_a_cpu_generator():
    t = data.BatchTransform([0.4, 0.5, 0.6], [0.2, 0.3, 0.4], crop_padding=4, horizontal_flip=True)
    x = random_batch(n=256, h=32, w=32)
    cpu = t(x, train=True, generator=torch.Generator().manual_seed(5))
    gpu = t(x.cuda(), train=True, generator=torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-6)
    g = torch.Generator(device="cuda").manual_seed(5)
    assert t(x.cuda(), train=True, generator=g).shape == x.shape
    assert t(x.cuda(), train=True).shape == x.shape  # default CUDA generator


# ----------------------------------------------------------------------------------------------------
# YAML files
# ----------------------------------------------------------------------------------------------------


def test_one_yaml_per_registered_data_set():
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(data.DATASET_SPECS) == sorted(DATASET_NAMES)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_yaml_composes_against_the_schema(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from popgrad_cli.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=[f"+dataset={name}"])
    assert OmegaConf.get_type(cfg.dataset) is DatasetConfig
    spec = data.DATASET_SPECS[name]
    assert cfg.dataset.name == name
    assert len(cfg.dataset.mean) == len(cfg.dataset.std) == spec.channels
    assert cfg.dataset.val_fraction == 0.1 and cfg.dataset.train_size is None and cfg.dataset.raw_dir is None
    expected_padding = {"cifar10": 4, "cifar100": 4, "svhn": 4, "stl10": 12}.get(name, 0)
    assert cfg.dataset.crop_padding == expected_padding
    assert cfg.dataset.horizontal_flip == (name in ("cifar10", "cifar100", "stl10"))


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_every_yaml_key_has_a_comment(name):
    text = (CONF_DIR / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    assert raw["defaults"] == ["/schema/dataset@_here_", "_self_"]
    assert set(raw) - {"defaults"} == set(DatasetConfig.__dataclass_fields__)
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and line.strip() != "defaults:":
            assert "#" in line, f"{name}.yaml: no comment on {line!r}"


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist package
# ----------------------------------------------------------------------------------------------------


def test_fashion_mnist_from_debian_package(tmp_path):
    present = all((DEBIAN_FASHION_MNIST / f).is_file() for f in data.DATASET_SPECS["fashion_mnist"].file_names)
    if not present:
        if os.environ.get("POPGRAD_REQUIRE_DATA"):
            pytest.fail(f"POPGRAD_REQUIRE_DATA is set but the Fashion-MNIST files are not in {DEBIAN_FASHION_MNIST}")
        pytest.skip(f"Debian's dataset-fashion-mnist files are not in {DEBIAN_FASHION_MNIST}")
    cfg = dataset_cfg("fashion_mnist", raw_dir=str(DEBIAN_FASHION_MNIST), val_fraction=0.0)
    splits = data.load_splits(cfg, data_cfg(tmp_path), seed=0)  # checksums verified (content MD5s)
    assert splits.train_images.shape == (60000, 1, 28, 28)
    assert splits.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(splits.train_labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test_labels).tolist() == [1000] * 10
    images = splits.train_images.double() / 255
    yaml_cfg = yaml.safe_load((CONF_DIR / "fashion_mnist.yaml").read_text())
    assert images.mean().item() == pytest.approx(yaml_cfg["mean"][0], abs=1e-3)
    assert images.std().item() == pytest.approx(yaml_cfg["std"][0], abs=1e-3)
