#!/usr/bin/env python3
"""Time training epochs of popgrad's Trainer against a bare PyTorch loop doing the same work.

Both sides train mlp (784-256-256-10) on Fashion-MNIST-shaped data held on the training
device, with batch 128 and SGD (lr 0.01, momentum 0.9, weight decay 1e-5):

- product: ``popgrad_cli.train.Trainer._train_epoch`` on a config composed as
  ``popgrad train`` composes it, so the epoch includes the batch transform, gradient-norm
  computation, finiteness checks and step bookkeeping, but not the validation pass;
- bare: randperm, slice, convert to float and normalise, then the gradient step and the
  SGD update, and nothing else. For the baseline the gradient step is forward,
  cross-entropy and backward. For PG it is the same ``PopulationGradient.backward`` that
  the product calls, so the ratio measures the training loop's overhead, not PG's.

The epochs of the two sides alternate after one warm-up epoch each, so a change in machine
load hits both sides alike. Real Fashion-MNIST is read from ``--raw-dir`` when its four IDX
files are there; otherwise random uint8 images of the same shape stand in for it.

    python scripts/bench_train.py                    # the GPU when one is present, else the CPU
    python scripts/bench_train.py --quick            # 4096 training images, 2 timed epochs
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from popgrad_cli.data import DataSplits, load_splits
from popgrad_cli.models import build_model
from popgrad_cli.population import build_estimator

from bench_common import compose_config, load_average, prepare_hydra, resolve_device, synchronize
from popgrad_cli.train import SignalGuard, Trainer, seed_everything

DEFAULT_RAW_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
RANDOM_TRAIN_IMAGES = 60000
RANDOM_TEST_IMAGES = 10000
QUICK_TRAIN_SIZE = 4096
QUICK_EPOCHS = 2
DEFAULT_EPOCHS = 3
MAX_RATIO = 1.3  # target: the product's epoch within 1.3 x the bare loop's

METHODS = {
    "baseline": ["method=baseline"],
    "pg": ["method=pg", "method.population_size=8", "method.batch=shared", "method.engine=vmap"],
}

CSV_COLUMNS = (
    "device",
    "model",
    "data",
    "train_samples",
    "batch_size",
    "method",
    "engine",
    "batch",
    "P",
    "epochs",
    "product_epoch_s",
    "product_min_s",
    "product_max_s",
    "bare_epoch_s",
    "bare_min_s",
    "bare_max_s",
    "ratio_product_to_bare",
    "threads",
)


@dataclass
class Timing:
    method: str
    cfg: object
    train_samples: int
    product: List[float]
    bare: List[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.product) / statistics.median(self.bare)



def has_fashion_mnist(raw_dir: Path) -> bool:
    return all((raw_dir / name).is_file() for name in IDX_FILES)


def random_splits(train_size: Optional[int], val_fraction: float, device: torch.device) -> DataSplits:
    """Return random uint8 images split like Fashion-MNIST: 60000 training images, less the validation share."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (RANDOM_TRAIN_IMAGES, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (RANDOM_TRAIN_IMAGES,), generator=generator)
    n_val = int(round(val_fraction * RANDOM_TRAIN_IMAGES))
    n_train = RANDOM_TRAIN_IMAGES - n_val if train_size is None else train_size
    return DataSplits(
        train_images=images[n_val : n_val + n_train].to(device),
        train_labels=labels[n_val : n_val + n_train].to(device),
        val_images=images[:n_val].to(device),
        val_labels=labels[:n_val].to(device),
        test_images=images[:RANDOM_TEST_IMAGES].to(device),
        test_labels=labels[:RANDOM_TEST_IMAGES].to(device),
        num_classes=10,
        input_shape=(1, 28, 28),
        name="random uint8 (Fashion-MNIST shape)",
    )


class BareLoop:
    """The same training work as Trainer._train_epoch written as a plain PyTorch loop."""

    def __init__(self, cfg, splits: DataSplits, device: torch.device) -> None:
        self.device = device
        self.images = splits.train_images
        self.labels = splits.train_labels
        self.batch_size = int(cfg.trainer.batch_size)
        self.model = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.optimizer.lr,
            momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )
        steps = -(-len(self.labels) // self.batch_size) * int(cfg.trainer.epochs)
        self.population = None
        if cfg.method.name == "pg":
            self.population = build_estimator(self.model, cfg.method, steps)
        # x / 255 normalised by the data set's mean and std, as one multiply and one add.
        mean = torch.tensor(list(cfg.dataset.mean), device=device).view(1, -1, 1, 1)
        std = torch.tensor(list(cfg.dataset.std), device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std
        self.step = 0

    def train_epoch(self) -> None:
        self.model.train()
        permutation = torch.randperm(len(self.labels), device=self.device)
        for start in range(0, len(self.labels), self.batch_size):
            index = permutation[start : start + self.batch_size]
            inputs = self.images[index].float().mul_(self.scale).add_(self.shift)
            targets = self.labels[index]
            self.optimizer.zero_grad(set_to_none=True)
            if self.population is None:
                F.cross_entropy(self.model(inputs), targets).backward()
            else:
                self.population.backward(inputs, targets, self.step)
            self.optimizer.step()
            self.step += 1


def time_call(function, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def bench_method(method: str, overrides: List[str], splits: DataSplits, device: torch.device, epochs: int, run_dir: Path) -> Timing:
    cfg = compose_config(overrides + METHODS[method] + [f"trainer.epochs={epochs + 1}"])
    seed_everything(cfg.seed)
    trainer = Trainer(cfg, run_dir / method, device, splits)
    seed_everything(cfg.seed)
    bare = BareLoop(cfg, splits, device)

    def product_epoch() -> None:
        # Trainer._end_epoch clears the permutation so that each epoch draws a new one.
        # It also runs the validation pass, which the bare loop has no part of, so it is
        # left out and the permutation is cleared here.
        trainer.progress.permutation = None
        with SignalGuard() as guard:
            trainer._train_epoch(guard)

    product_times: List[float] = []
    bare_times: List[float] = []
    for epoch in range(epochs + 1):
        product_time = time_call(product_epoch, device)
        bare_time = time_call(bare.train_epoch, device)
        kind = "warm-up" if epoch == 0 else f"epoch {epoch}/{epochs}"
        print(f"{method} {kind}: product {product_time:.2f} s, bare {bare_time:.2f} s", file=sys.stderr, flush=True)
        if epoch > 0:
            product_times.append(product_time)
            bare_times.append(bare_time)
    return Timing(method, cfg, len(splits.train_labels), product_times, bare_times)


def csv_row(timing: Timing, device: torch.device, data_label: str) -> Dict[str, object]:
    cfg = timing.cfg
    pg = cfg.method.name == "pg"
    return {
        "device": device.type,
        "model": cfg.model.name,
        "data": data_label,
        "train_samples": timing.train_samples,
        "batch_size": cfg.trainer.batch_size,
        "method": timing.method,
        "engine": cfg.method.engine if pg else "",
        "batch": cfg.method.batch if pg else "",
        "P": cfg.method.population_size if pg else 1,
        "epochs": len(timing.product),
        "product_epoch_s": f"{statistics.median(timing.product):.3f}",
        "product_min_s": f"{min(timing.product):.3f}",
        "product_max_s": f"{max(timing.product):.3f}",
        "bare_epoch_s": f"{statistics.median(timing.bare):.3f}",
        "bare_min_s": f"{min(timing.bare):.3f}",
        "bare_max_s": f"{max(timing.bare):.3f}",
        "ratio_product_to_bare": f"{timing.ratio:.3f}",
        "threads": torch.get_num_threads(),
    }


def format_table(rows: List[Dict[str, object]]) -> str:
    columns = ("method", "engine", "batch", "P", "epochs", "product_epoch_s", "bare_epoch_s", "ratio_product_to_bare")
    header = ("method", "engine", "batch", "P", "epochs", "product_s", "bare_s", "ratio")
    lines = [header] + [tuple(str(row[column] or "-") for column in columns) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)




def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train; auto picks the GPU when one is present (default: auto)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"timed epochs per side after one warm-up epoch (default: {DEFAULT_EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"train on {QUICK_TRAIN_SIZE} images for {QUICK_EPOCHS} timed epochs: a smoke test of under a minute")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU work (default: torch's own choice, 1 with --quick)")
    parser.add_argument("--raw-dir", type=Path, default=DEFAULT_RAW_DIR,
                        help=f"folder with the four Fashion-MNIST IDX .gz files (default: {DEFAULT_RAW_DIR}); "
                        "random images stand in when they are missing")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="data.root for popgrad's decoded-data cache (default: a temporary folder, removed at exit)")
    parser.add_argument("--out", type=Path, default=Path("bench_train.csv"),
                        help="CSV file for the rows (default: bench_train.csv in the current folder)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.epochs < 1:
        parser.error(f"--epochs {args.epochs} is invalid; use an integer >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} is invalid; use an integer >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # On a machine that other jobs share, threads that wait for each other at every op
        # make small steps many times slower (an mlp step took 13 ms on one thread and
        # 140 ms on two, on 2 busy cores). One thread keeps a smoke test short.
        torch.set_num_threads(1)
    prepare_hydra()

    with tempfile.TemporaryDirectory(prefix="popgrad-bench-") as scratch:
        scratch_dir = Path(scratch)
        data_root = args.data_root or scratch_dir / "data"
        real_data = has_fashion_mnist(args.raw_dir)
        overrides = [
            "dataset=fashion_mnist",
            "model=mlp",
            "trainer.progress=false",
            f"device={device.type}",
            f"data.root={data_root}",
        ]
        if real_data:
            overrides.append(f"dataset.raw_dir={args.raw_dir}")
        if args.quick:
            overrides.append(f"dataset.train_size={QUICK_TRAIN_SIZE}")

        data_cfg = compose_config(overrides)
        if real_data:
            splits = load_splits(data_cfg.dataset, data_cfg.data, data_cfg.seed, device)
            data_label = f"fashion_mnist ({args.raw_dir})"
        else:
            print(f"Fashion-MNIST files not found in {args.raw_dir}; using random uint8 images", file=sys.stderr)
            splits = random_splits(QUICK_TRAIN_SIZE if args.quick else None, data_cfg.dataset.val_fraction, device)
            data_label = "random uint8 1x28x28"

        print(
            f"torch {torch.__version__}, device {device.type}, {torch.get_num_threads()} threads, "
            f"{data_label}: {len(splits.train_labels)} training images, batch {data_cfg.trainer.batch_size}, "
            f"median of {args.epochs} epochs after 1 warm-up epoch, load average {load_average()}",
            flush=True,
        )
        timings = [
            bench_method(method, overrides, splits, device, args.epochs, scratch_dir / "runs")
            for method in METHODS
        ]

    rows = [csv_row(timing, device, data_label) for timing in timings]
    print("\nEpoch time in seconds (median), product Trainer._train_epoch against the bare loop")
    print(format_table(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {args.out}; load average now {load_average()}")

    print(f"\nTarget: product epoch <= {MAX_RATIO} x bare loop epoch")
    for timing in timings:
        verdict = "holds" if timing.ratio <= MAX_RATIO else "FAILS"
        print(
            f"- {timing.method}: {statistics.median(timing.product):.2f} s / "
            f"{statistics.median(timing.bare):.2f} s = {timing.ratio:.2f}: {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
