#!/usr/bin/env python3
"""Time one optimisation step of the plain gradient and of Population Gradients (PG).

A step is ``optimizer.zero_grad``, ``estimator.backward`` and an SGD step on one fixed
random batch of 128 samples, with the estimator that ``popgrad train`` builds. Each row
reports the median and the interquartile range of ``--repeats`` timed steps taken after
``--warmup`` untimed ones, and the peak memory of the step.

The main table covers mlp (784-256-256-10) and the project's cnn at 1x28x28 and 3x32x32
inputs, plus resnet18 at 3x32x32 on a GPU: the baseline, then PG with the loop and vmap
engines, shared and split batches, at P in {1, 2, 4, 8, 16}. The second table sweeps
method.chunk_size in {1, 2, 4, 8, 16} for vmap with shared batches at P = 16. The script
ends with a verdict on each speed and memory target, measured on these tables.

On a CPU a default run runs cnn at P in {1, 8} only and sweeps the chunk size for mlp
only; it took 4.4 minutes on the 2-core machine that docs/benchmarks.md records.
``--full`` runs every P for every model and adds cnn at 1x28x28 to the sweep; it took
13 minutes there.

    python scripts/bench_pg.py                       # the GPU when one is present, else the CPU
    python scripts/bench_pg.py --device cuda --out bench_pg_cuda.csv
    python scripts/bench_pg.py --full --out bench_pg_full.csv
    python scripts/bench_pg.py --quick               # mlp only, for a smoke test
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from popgrad_cli.models import build_model
from popgrad_cli.population import build_estimator

from bench_common import compose_config, load_average, prepare_hydra, resolve_device, synchronize

BATCH_SIZE = 128
NUM_CLASSES = 10
MIN_REPEATS = 20
POPULATION_SIZES = (1, 2, 4, 8, 16)
CPU_CNN_POPULATION_SIZES = (1, 8)
CHUNK_SIZES = (1, 2, 4, 8, 16)  # the chunk sweep runs at P = the largest chunk size
QUICK_POPULATION_SIZES = (8,)
QUICK_CHUNK_SIZES = (1, 2, 4)

# Targets, checked at the end on the measured table.
CPU_SHARED_SLACK = 1.15  # vmap shared at P=8 within 1.15 x 8 x the baseline step
SPLIT_MAX_RATIO = 1.5  # split at P=8 within 1.5 x the baseline step
GPU_SHARED_MAX_RATIO = 3.0  # vmap shared at P=8 within 3 x the baseline step on a GPU
TARGET_P = 8
# Relative slack on the linear bound of check_memory. The measured peaks are
# allocation sums, so they repeat from run to run and need little slack.
MEMORY_TOLERANCE = 0.01

# (model name, input shape (C, H, W)). resnet18 runs on a GPU only, because its PG rows
# at P = 16 cost 16 resnet18 steps each, far beyond the time budget of a CPU run.
ModelInput = Tuple[str, Tuple[int, int, int]]
MLP: ModelInput = ("mlp", (1, 28, 28))
CNN_28: ModelInput = ("cnn", (1, 28, 28))
CNN_32: ModelInput = ("cnn", (3, 32, 32))
RESNET18: ModelInput = ("resnet18", (3, 32, 32))

CSV_COLUMNS = (
    "device",
    "model",
    "input",
    "method",
    "engine",
    "batch",
    "P",
    "chunk",
    "step_ms",
    "step_ms_iqr",
    "ratio_to_baseline",
    "peak_mem_mb",
    "mem_method",
    "threads",
    "repeats",
)

# Both devices report the peak of one step above the bytes live when it starts (the
# model, its optimizer state, the batch and the previous step's gradients).
CPU_MEMORY_METHOD = "torch.profiler allocations, peak above step start"
CUDA_MEMORY_METHOD = "cuda max_memory_allocated, peak above step start"


@dataclass(frozen=True)
class Case:
    """One row: a model at an input shape with one gradient estimator setting."""

    model: str
    input_shape: Tuple[int, int, int]
    method: str  # baseline or pg
    engine: str = ""
    batch: str = ""
    population: int = 1
    chunk: Optional[int] = None  # None: all P members in one chunk, the product default

    @property
    def input_label(self) -> str:
        return "x".join(str(size) for size in self.input_shape)

    @property
    def effective_chunk(self) -> Optional[int]:
        if self.method == "baseline":
            return None
        return self.chunk or self.population

    def overrides(self) -> List[str]:
        model_overrides = [f"model={self.model}"]
        if self.method == "baseline":
            return model_overrides + ["method=baseline"]
        return model_overrides + [
            "method=pg",
            f"method.population_size={self.population}",
            f"method.engine={self.engine}",
            f"method.batch={self.batch}",
            f"method.chunk_size={'null' if self.chunk is None else self.chunk}",
        ]


@dataclass
class Result:
    case: Case
    device: str
    step_ms: float
    step_ms_iqr: float
    peak_mem_mb: Optional[float]
    mem_method: str
    threads: int
    repeats: int
    ratio_to_baseline: Optional[float] = None

    def csv_row(self) -> Dict[str, object]:
        case = self.case
        return {
            "device": self.device,
            "model": case.model,
            "input": case.input_label,
            "method": case.method,
            "engine": case.engine,
            "batch": case.batch,
            "P": case.population,
            "chunk": "" if case.effective_chunk is None else case.effective_chunk,
            "step_ms": f"{self.step_ms:.3f}",
            "step_ms_iqr": f"{self.step_ms_iqr:.3f}",
            "ratio_to_baseline": "" if self.ratio_to_baseline is None else f"{self.ratio_to_baseline:.3f}",
            "peak_mem_mb": "" if self.peak_mem_mb is None else f"{self.peak_mem_mb:.2f}",
            "mem_method": self.mem_method,
            "threads": self.threads,
            "repeats": self.repeats,
        }


@dataclass
class Verdict:
    target: str
    status: str  # holds, FAILS or not measured
    details: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Configs and rows
# ---------------------------------------------------------------------------



@dataclass
class Plan:
    """The rows of one run: the P values per model and input, and the chunk sweep."""

    populations: Dict[ModelInput, Sequence[int]]
    sweep_models: Sequence[ModelInput]
    chunks: Sequence[int]


def make_plan(device: torch.device, quick: bool, full: bool) -> Plan:
    if quick:
        return Plan({MLP: QUICK_POPULATION_SIZES}, [MLP], QUICK_CHUNK_SIZES)
    if device.type == "cuda":
        models = (MLP, CNN_28, CNN_32, RESNET18)
        return Plan({model: POPULATION_SIZES for model in models}, models, CHUNK_SIZES)
    if full:
        return Plan({model: POPULATION_SIZES for model in (MLP, CNN_28, CNN_32)}, [MLP, CNN_28], CHUNK_SIZES)
    # A cnn step at batch 128 takes 0.1 s on the 2-core machine in docs/benchmarks.md, so
    # every P for both cnn inputs triples the run time there (4.4 to 13 minutes).
    cnn_populations = CPU_CNN_POPULATION_SIZES
    return Plan({MLP: POPULATION_SIZES, CNN_28: cnn_populations, CNN_32: cnn_populations}, [MLP], CHUNK_SIZES)


def main_cases(plan: Plan) -> List[Case]:
    cases = []
    for (model, shape), populations in plan.populations.items():
        cases.append(Case(model, shape, "baseline"))
        for population in populations:
            for batch in ("shared", "split"):
                for engine in ("loop", "vmap"):
                    cases.append(Case(model, shape, "pg", engine, batch, population))
    return cases


def sweep_case(model: str, shape: Tuple[int, int, int], chunk: int, population: int) -> Case:
    # chunk = P is the default (chunk_size null), so the main table's row is reused.
    chunk_size = None if chunk == population else chunk
    return Case(model, shape, "pg", "vmap", "shared", population, chunk_size)


def sweep_cases(plan: Plan) -> List[Case]:
    population = max(plan.chunks)
    return [sweep_case(model, shape, chunk, population) for model, shape in plan.sweep_models for chunk in plan.chunks]


# ---------------------------------------------------------------------------
# Measuring one row
# ---------------------------------------------------------------------------



def cpu_step_peak_bytes(step: Callable[[], None]) -> Optional[int]:
    """Run `step` once under torch.profiler; return its peak bytes above those live at its start.

    tracemalloc tracks only Python's own allocator. Max RSS never falls within a process,
    so it would need a fresh interpreter per row, which costs seconds of imports each, and
    glibc's reuse of freed pages blurs it even then. The profiler with profile_memory=True
    records each allocation and free of torch's CPU allocator, and the running sum of those
    events from the start of the step peaks at the step's peak. Buffers that libraries such
    as oneDNN allocate outside torch's allocator are not counted.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # NOTE: kineto_results is not a documented attribute (checked on torch 2.14). The
    # documented prof.events() folds allocations into the op that made them, which hides a
    # peak inside one op, so the raw allocation events are read here.
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


class Row:
    """The model, estimator, optimizer and batch of one case, ready to take steps."""

    def __init__(self, case: Case, device: torch.device) -> None:
        self.case = case
        self.device = device
        cfg = compose_config(case.overrides())
        torch.manual_seed(0)
        model = build_model(cfg.model, case.input_shape, NUM_CLASSES).to(device)
        inputs = torch.randn(BATCH_SIZE, *case.input_shape, device=device)
        # The same memory format as popgrad_cli.train.Trainer uses for conv nets on a GPU.
        if device.type == "cuda" and case.model != "mlp":
            model = model.to(memory_format=torch.channels_last)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        model.train()
        self.inputs = inputs
        self.targets = torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), device=device)
        self.estimator = build_estimator(model, cfg.method, total_steps=10_000)
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.optimizer.lr,
            momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )
        self.step_numbers = itertools.count()
        self.times: List[float] = []

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.estimator.backward(self.inputs, self.targets, next(self.step_numbers))
        self.optimizer.step()

    def timed_step(self) -> None:
        synchronize(self.device)
        started = time.perf_counter()
        self.step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - started)

    def peak_bytes(self) -> Optional[int]:
        """Return the peak bytes of one more step above the bytes live at its start."""
        if self.device.type != "cuda":
            return cpu_step_peak_bytes(self.step)
        # NOTE: the CUDA paths of this script (timing, memory, channels_last) have not
        # run on a GPU yet; only the CPU paths are checked against docs/benchmarks.md.
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        live = torch.cuda.memory_allocated(self.device)
        self.step()
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - live


def measure_group(cases: Sequence[Case], device: torch.device, repeats: int, warmup: int) -> Dict[Case, Result]:
    """Time the rows of one model and input in turns, one step of each row per round.

    Turns put every row under the same machine load, so the ratios to the baseline stay
    meaningful on a machine that other jobs share. Each row keeps its own model,
    estimator and optimizer, so no row's state affects another's.
    """
    rows = [Row(case, device) for case in cases]
    for row in rows:
        for _ in range(warmup):
            row.step()
    for repeat in range(repeats):
        for row in rows:
            row.timed_step()
        print(f"  round {repeat + 1}/{repeats}", file=sys.stderr, flush=True)

    results = {}
    for row in rows:
        peak = row.peak_bytes()
        quartiles = statistics.quantiles(row.times, n=4)
        results[row.case] = Result(
            case=row.case,
            device=device.type,
            step_ms=statistics.median(row.times) * 1e3,
            step_ms_iqr=(quartiles[2] - quartiles[0]) * 1e3,
            peak_mem_mb=None if peak is None else peak / 2**20,
            mem_method=CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
            threads=torch.get_num_threads(),
            repeats=repeats,
        )
    del rows
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def attach_ratios(results: Dict[Case, Result]) -> None:
    baselines = {
        (case.model, case.input_shape): result.step_ms
        for case, result in results.items()
        if case.method == "baseline"
    }
    for case, result in results.items():
        baseline = baselines.get((case.model, case.input_shape))
        if baseline:
            result.ratio_to_baseline = result.step_ms / baseline


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def find(results: Dict[Case, Result], **fields) -> Optional[Result]:
    case = Case(**fields)
    return results.get(case)


def model_inputs(results: Dict[Case, Result]) -> List[Tuple[str, Tuple[int, int, int]]]:
    seen: Dict[Tuple[str, Tuple[int, int, int]], None] = {}
    for case in results:
        seen.setdefault((case.model, case.input_shape), None)
    return list(seen)


def label(model: str, shape: Tuple[int, int, int]) -> str:
    return f"{model} {'x'.join(map(str, shape))}"


def check_cpu_shared(results, device_type: str) -> Verdict:
    target = (
        f"CPU: vmap shared at P={TARGET_P} <= {CPU_SHARED_SLACK} x {TARGET_P} x baseline "
        "and no slower than loop"
    )
    if device_type != "cpu":
        return Verdict(target, "not measured", ["this run was on a GPU"])
    verdict = Verdict(target, "holds")
    for model, shape in model_inputs(results):
        baseline = find(results, model=model, input_shape=shape, method="baseline")
        vmap = find(results, model=model, input_shape=shape, method="pg", engine="vmap", batch="shared", population=TARGET_P)
        loop = find(results, model=model, input_shape=shape, method="pg", engine="loop", batch="shared", population=TARGET_P)
        if baseline is None or vmap is None or loop is None:
            continue
        limit = CPU_SHARED_SLACK * TARGET_P * baseline.step_ms
        ok = vmap.step_ms <= limit and vmap.step_ms <= loop.step_ms
        verdict.details.append(
            f"{label(model, shape)}: vmap {vmap.step_ms:.2f} ms = {vmap.ratio_to_baseline:.2f} x baseline "
            f"{baseline.step_ms:.2f} ms (limit {limit:.2f} ms), loop {loop.step_ms:.2f} ms: "
            + ("holds" if ok else "FAILS")
        )
        if not ok:
            verdict.status = "FAILS"
    if not verdict.details:
        verdict.status = "not measured"
    return verdict


def check_split(results) -> Verdict:
    verdict = Verdict(f"split at P={TARGET_P} <= {SPLIT_MAX_RATIO} x baseline (each engine)", "holds")
    for model, shape in model_inputs(results):
        baseline = find(results, model=model, input_shape=shape, method="baseline")
        for engine in ("loop", "vmap"):
            split = find(results, model=model, input_shape=shape, method="pg", engine=engine, batch="split", population=TARGET_P)
            if baseline is None or split is None:
                continue
            ok = split.step_ms <= SPLIT_MAX_RATIO * baseline.step_ms
            verdict.details.append(
                f"{label(model, shape)} {engine}: {split.step_ms:.2f} ms = {split.ratio_to_baseline:.2f} x "
                f"baseline {baseline.step_ms:.2f} ms: " + ("holds" if ok else "FAILS")
            )
            if not ok:
                verdict.status = "FAILS"
    if not verdict.details:
        verdict.status = "not measured"
    return verdict


def check_gpu_shared(results, device_type: str) -> Verdict:
    target = f"GPU: vmap shared at P={TARGET_P} on mlp and cnn <= {GPU_SHARED_MAX_RATIO} x baseline"
    if device_type != "cuda":
        return Verdict(target, "not measured", ["no GPU in this run; rerun with --device cuda on a GPU machine"])
    verdict = Verdict(target, "holds")
    for model, shape in model_inputs(results):
        if model not in ("mlp", "cnn"):
            continue
        baseline = find(results, model=model, input_shape=shape, method="baseline")
        vmap = find(results, model=model, input_shape=shape, method="pg", engine="vmap", batch="shared", population=TARGET_P)
        if baseline is None or vmap is None:
            continue
        ok = vmap.step_ms <= GPU_SHARED_MAX_RATIO * baseline.step_ms
        verdict.details.append(
            f"{label(model, shape)}: vmap {vmap.step_ms:.2f} ms = {vmap.ratio_to_baseline:.2f} x baseline "
            f"{baseline.step_ms:.2f} ms: " + ("holds" if ok else "FAILS")
        )
        if not ok:
            verdict.status = "FAILS"
    if not verdict.details:
        verdict.status = "not measured"
    return verdict


def check_memory(results, chunks: Sequence[int]) -> Verdict:
    """Check that peak memory grows at most linearly in the chunk size.

    Linear growth adds the same memory per member at every chunk size, and faster growth
    adds more at larger chunks. So each per-member increment must stay within
    MEMORY_TOLERANCE of the largest increment before it. Increments of zero at the small
    chunks are skipped: there a part that does not depend on the chunk, such as the
    P offsets, sets the peak.
    """
    population = max(chunks)
    verdict = Verdict(f"peak memory grows at most linearly in the chunk size (vmap shared, P={population})", "holds")
    for model, shape in model_inputs(results):
        points = []
        for chunk in chunks:
            result = results.get(sweep_case(model, shape, chunk, population))
            if result is not None and result.peak_mem_mb is not None:
                points.append((chunk, result.peak_mem_mb))
        if len(points) < 2:
            continue
        increments = [
            (peak2 - peak1) / (chunk2 - chunk1)
            for (chunk1, peak1), (chunk2, peak2) in zip(points, points[1:])
        ]
        ok = True
        largest = 0.0
        for increment in increments:
            if largest > 0 and increment > largest * (1 + MEMORY_TOLERANCE):
                ok = False
            largest = max(largest, increment)
        peaks = ", ".join(f"chunk {chunk}: {peak:.1f}" for chunk, peak in points)
        steps = ", ".join(f"{increment:.2f}" for increment in increments)
        verdict.details.append(
            f"{label(model, shape)}: peak MB {peaks}; MB per added member {steps}: "
            + ("holds" if ok else "FAILS")
        )
        if not ok:
            verdict.status = "FAILS"
    if not verdict.details:
        verdict.status = "not measured"
    return verdict


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def format_table(rows: List[Result]) -> str:
    header = ("model", "input", "method", "engine", "batch", "P", "chunk", "step_ms", "iqr_ms", "x_base", "peak_MB")
    lines = [header]
    for result in rows:
        row = result.csv_row()
        lines.append(
            (
                row["model"],
                row["input"],
                row["method"],
                row["engine"] or "-",
                row["batch"] or "-",
                str(row["P"]),
                str(row["chunk"] or "-"),
                f"{result.step_ms:.2f}",
                f"{result.step_ms_iqr:.2f}",
                "-" if result.ratio_to_baseline is None else f"{result.ratio_to_baseline:.2f}",
                "-" if result.peak_mem_mb is None else f"{result.peak_mem_mb:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


def print_report(results: Dict[Case, Result], main_rows: List[Case], sweep_rows: List[Case], chunks: Sequence[int]) -> None:
    """Print the main table, the chunk sweep and the verdict on each target."""
    device_type = next(iter(results.values())).device
    memory_method = CUDA_MEMORY_METHOD if device_type == "cuda" else CPU_MEMORY_METHOD
    repeats = min(result.repeats for result in results.values())
    print(f"\nStep time (median of {repeats}) and peak memory ({memory_method})")
    print(format_table([results[case] for case in main_rows]))
    if sweep_rows:
        print(f"\nChunk-size sweep: PG vmap, shared batch, P={max(chunks)}")
        print(format_table([results[case] for case in sweep_rows]))

    print("\nTargets:")
    verdicts = [
        check_cpu_shared(results, device_type),
        check_split(results),
        check_gpu_shared(results, device_type),
        check_memory(results, chunks),
    ]
    for verdict in verdicts:
        print(f"- {verdict.target}: {verdict.status}")
        for detail in verdict.details:
            print(f"    {detail}")


def read_csv(path: Path):
    """Read a CSV that this script wrote; return its results, main rows, sweep rows and chunk sizes."""
    results: Dict[Case, Result] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            population = int(row["P"])
            chunk = int(row["chunk"]) if row["chunk"] else None
            case = Case(
                model=row["model"],
                input_shape=tuple(int(size) for size in row["input"].split("x")),
                method=row["method"],
                engine=row["engine"],
                batch=row["batch"],
                population=population,
                chunk=None if chunk == population else chunk,
            )
            results[case] = Result(
                case=case,
                device=row["device"],
                step_ms=float(row["step_ms"]),
                step_ms_iqr=float(row["step_ms_iqr"]),
                peak_mem_mb=float(row["peak_mem_mb"]) if row["peak_mem_mb"] else None,
                mem_method=row["mem_method"],
                threads=int(row["threads"]),
                repeats=int(row["repeats"]),
                ratio_to_baseline=float(row["ratio_to_baseline"]) if row["ratio_to_baseline"] else None,
            )
    swept = [case for case in results if case.chunk is not None]
    if not swept:
        return results, list(results), [], []
    population = swept[0].population
    chunks = sorted({case.chunk for case in swept} | {population})
    sweep_models = list(dict.fromkeys((case.model, case.input_shape) for case in swept))
    sweep_rows = [sweep_case(model, shape, chunk, population) for model, shape in sweep_models for chunk in chunks]
    main_rows = [case for case in results if case.chunk is None]
    return results, main_rows, sweep_rows, chunks


def write_csv(path: Path, rows: List[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in rows:
            writer.writerow(result.csv_row())


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------




def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run; auto picks the GPU when one is present (default: auto)")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"timed steps per row, at least {MIN_REPEATS} (default: {MIN_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before the timed ones in each row (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="mlp only, P = 8 and chunk sizes {1, 2, 4} at P = 4: a smoke test of under a minute")
    parser.add_argument("--full", action="store_true",
                        help="on a CPU, run cnn at every P and add it to the chunk sweep (the GPU default)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for CPU work (default: torch's own choice, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("bench_pg.csv"),
                        help="CSV file for the rows (default: bench_pg.csv in the current folder)")
    parser.add_argument("--report", type=Path, default=None, metavar="CSV",
                        help="measure nothing: print the tables and target verdicts of a CSV this script wrote")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other; pick one")
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats {args.repeats} is too few; use at least {MIN_REPEATS} so each median rests on 20 steps")
    if args.warmup < 1:
        parser.error(f"--warmup {args.warmup} is invalid; use at least 1 so first-call costs stay out of the timing")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} is invalid; use an integer >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print_report(*read_csv(args.report))
        return 0
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:
        # On a machine that other jobs share, threads that wait for each other at every op
        # make small steps many times slower (an mlp step took 13 ms on one thread and
        # 140 ms on two, on 2 busy cores). One thread keeps a smoke test short.
        torch.set_num_threads(1)
    prepare_hydra()

    plan = make_plan(device, args.quick, args.full)
    main_rows = main_cases(plan)
    sweep_rows = sweep_cases(plan)
    pending = list(dict.fromkeys(main_rows + sweep_rows))

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"torch {torch.__version__}, device {device.type} (GPU: {gpu}), {torch.get_num_threads()} threads, "
        f"{args.repeats} timed steps per row after {args.warmup} warm-up steps, batch {BATCH_SIZE}, "
        f"load average {load_average()}",
        flush=True,
    )
    results: Dict[Case, Result] = {}
    started = time.perf_counter()
    for model, shape in plan.populations:
        group = [case for case in pending if (case.model, case.input_shape) == (model, shape)]
        print(f"{label(model, shape)}: {len(group)} rows", file=sys.stderr, flush=True)
        results.update(measure_group(group, device, args.repeats, args.warmup))
    attach_ratios(results)

    ordered = [results[case] for case in pending]
    write_csv(args.out, ordered)
    print(
        f"wrote {len(ordered)} rows to {args.out} in {time.perf_counter() - started:.0f} s; "
        f"load average now {load_average()}"
    )
    print_report(results, main_rows, sweep_rows, plan.chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
