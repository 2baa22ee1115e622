"""PNG figures for ``popgrad collect``: learning curves and the differences from the baseline.

The figures are drawn on matplotlib's Agg canvas directly, without pyplot, so
that collecting never opens a window, never changes the backend of a session
that imported this module, and never keeps figures alive in pyplot's registry.
"""

from __future__ import annotations

import functools
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

DPI = 100
# Font sizes set through rcParams, because tick_params on each axes rebuilds its
# ticks, which measured slower for a figure of nine panels.
STYLE = {"xtick.labelsize": 8, "ytick.labelsize": 8}
# Learning-curve panels per row of a figure.
PANEL_COLUMNS = 3
# Maximum number of bars in the difference chart. More would be too tall to read
# and slow to draw, because the text of each label costs more than its bar.
MAX_DIFFERENCE_BARS = 30

# Longer bar labels are cut in the middle, so the figure keeps a readable width.
MAX_LABEL_CHARACTERS = 70

BASELINE_COLORS = ("black", "dimgrey", "darkgrey")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
ABOVE_ZERO_COLOR = "tab:green"
BELOW_ZERO_COLOR = "tab:red"
UNCLEAR_COLOR = "tab:gray"


@dataclass
class Curve:
    """One configuration's learning curves: (epochs, values) per run, one run per seed."""

    label: str
    runs: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    is_baseline: bool = False


@dataclass
class Panel:
    """One set of shared settings: the curves of the configurations that differ only in the method."""

    title: str
    curves: List[Curve] = field(default_factory=list)


def _styled(plot: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``plot`` inside this module's matplotlib style, leaving the caller's rcParams alone."""

    @functools.wraps(plot)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)

    return wrapper


def mean_band(runs: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return epochs, mean, sample std (ddof=1) and run count at each epoch over the runs.

    An epoch's statistics use the runs that reached it, so runs that stopped
    early drop out of the later epochs. The std is NaN where only one run is left.
    """
    values_by_epoch: dict = {}
    for epochs, values in runs:
        for epoch, value in zip(epochs.tolist(), values.tolist()):
            values_by_epoch.setdefault(epoch, []).append(value)
    epochs = np.array(sorted(values_by_epoch), dtype=float)
    means = np.empty(len(epochs))
    stds = np.full(len(epochs), np.nan)
    counts = np.empty(len(epochs), dtype=int)
    for index, epoch in enumerate(epochs.tolist()):
        column = np.asarray(values_by_epoch[epoch], dtype=float)
        column = column[np.isfinite(column)]
        counts[index] = len(column)
        means[index] = column.mean() if len(column) else np.nan
        if len(column) >= 2:
            stds[index] = column.std(ddof=1)
    return epochs, means, stds, counts


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return f"{text[:keep]}...{text[-keep:]}"


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)


def _line_styles(panels: Sequence[Panel]) -> Dict[str, Tuple[str, str]]:
    """Give each curve label one (color, line style) for the whole figure, baselines dashed in greys."""
    styles: Dict[str, Tuple[str, str]] = {}
    baselines = 0
    others = 0
    for panel in panels:
        for curve in panel.curves:
            if curve.label in styles:
                continue
            if curve.is_baseline:
                styles[curve.label] = (BASELINE_COLORS[baselines % len(BASELINE_COLORS)], "--")
                baselines += 1
            else:
                styles[curve.label] = (COLORS[others % len(COLORS)], "-")
                others += 1
    return styles


def _draw_panel(axes, panel: Panel, styles: Dict[str, Tuple[str, str]]) -> None:
    seed_counts = []
    for curve in panel.curves:
        epochs, means, stds, counts = mean_band(curve.runs)
        if len(epochs) == 0:
            continue
        seed_counts.append(int(counts.max()))
        color, style = styles[curve.label]
        if len(epochs) == 1:
            # A band over one epoch has no width, so a single epoch gets an error bar.
            error = None if np.isnan(stds[0]) else stds[0]
            axes.errorbar(epochs, means, yerr=error, color=color, marker="o", capsize=4)
            continue
        marker = "o" if len(epochs) <= 15 else None
        axes.plot(epochs, means, linestyle=style, marker=marker, markersize=3, color=color)
        band = np.isfinite(stds)
        if band.any():
            axes.fill_between(epochs, means - stds, means + stds, where=band, color=color, alpha=0.15, linewidth=0)
    if seed_counts:
        low, high = min(seed_counts), max(seed_counts)
        seeds = f"{low} seeds" if low == high else f"{low}-{high} seeds per curve"
    else:
        seeds = "no curves"
    title = "\n".join(textwrap.wrap(f"{panel.title} ({seeds})", 42)[:2])
    axes.set_title(title, fontsize=9)
    # Few ticks per panel: creating tick objects is most of the drawing time.
    axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=4))
    axes.grid(True, alpha=0.3)


@_styled
def plot_learning_curves(path: Path, title: str, panels: Sequence[Panel], ylabel: str = "validation macro F1") -> None:
    """Draw one panel per set of settings, each curve a mean over seeds with a ±1 std band; write to ``path``.

    Panels are laid out three per row, and one legend below them names the curves.
    """
    count = len(panels)
    columns = min(PANEL_COLUMNS, count)
    rows = math.ceil(count / columns)
    styles = _line_styles(panels)
    legend_columns = min(3, len(styles) + 1)
    legend_rows = math.ceil((len(styles) + 1) / legend_columns)

    panel_width, panel_height = (6.4, 3.8) if count == 1 else (3.7, 2.8)
    top, bottom = 0.75, 0.45 + 0.24 * legend_rows
    width = columns * panel_width + 0.4
    height = rows * panel_height + top + bottom
    figure = Figure(figsize=(width, height))
    # Fixed margins in inches instead of tight_layout, which measures every
    # text again and about doubles the time per figure.
    figure.subplots_adjust(
        left=0.75 / width, right=1 - 0.2 / width, top=1 - top / height, bottom=bottom / height, wspace=0.3, hspace=0.45
    )
    grid = figure.add_gridspec(rows, columns)
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        axes = figure.add_subplot(grid[row, column])
        _draw_panel(axes, panel, styles)
        if index + columns >= count:
            axes.set_xlabel("epoch", fontsize=9)
        if column == 0:
            axes.set_ylabel(ylabel, fontsize=9)

    handles = [Line2D([], [], color=color, linestyle=style) for color, style in styles.values()]
    handles.append(Patch(color="grey", alpha=0.3))
    labels = [*styles, "band: ±1 std over seeds"]
    figure.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    figure.suptitle("\n".join(textwrap.wrap(title, 110)[:2]), fontsize=11)
    _save(figure, path)


@_styled
def plot_differences(
    path: Path,
    labels: Sequence[str],
    differences: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    n_pairs: Sequence[int],
    metric_label: str,
) -> int:
    """Draw one horizontal bar per comparison (method - baseline) with its 95% CI; return the bars drawn.

    Only the first ``MAX_DIFFERENCE_BARS`` comparisons are drawn, and the title then states the count.
    """
    total = len(labels)
    bars_drawn = min(total, MAX_DIFFERENCE_BARS)
    labels = list(labels)[:bars_drawn]
    differences = np.asarray(differences, dtype=float)[:bars_drawn]
    low = np.asarray(ci_low, dtype=float)[:bars_drawn]
    high = np.asarray(ci_high, dtype=float)[:bars_drawn]
    pairs = list(n_pairs)[:bars_drawn]

    colors = []
    for lower, upper in zip(low, high):
        if np.isfinite(lower) and lower > 0:
            colors.append(ABOVE_ZERO_COLOR)
        elif np.isfinite(upper) and upper < 0:
            colors.append(BELOW_ZERO_COLOR)
        else:
            colors.append(UNCLEAR_COLOR)
    has_interval = np.isfinite(low) & np.isfinite(high)
    error = np.vstack(
        [
            np.where(has_interval, differences - low, 0.0),
            np.where(has_interval, high - differences, 0.0),
        ]
    )

    tick_labels = [f"{_shorten(label, MAX_LABEL_CHARACTERS)}  (n={count})" for label, count in zip(labels, pairs)]
    # Room for the longest tick label at about 0.07 inch per character of 8-point text.
    label_width = 0.3 + 0.07 * max((len(text) for text in tick_labels), default=10)
    plot_width, top, bottom = 5.0, 0.6, 0.85
    width = label_width + plot_width + 0.3
    height = top + bottom + 0.32 * max(bars_drawn, 4)
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=label_width / width, right=1 - 0.3 / width, top=1 - top / height, bottom=bottom / height)
    axes = figure.add_subplot()
    positions = np.arange(bars_drawn)[::-1]
    bar_values = np.nan_to_num(differences, nan=0.0)
    axes.barh(positions, bar_values, color=colors, height=0.6)
    if has_interval.any():
        axes.errorbar(
            bar_values[has_interval], positions[has_interval], xerr=error[:, has_interval],
            fmt="none", ecolor="black", capsize=3, linewidth=1,
        )
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_yticks(positions)
    axes.set_yticklabels(tick_labels)
    axes.set_ylim(-0.7, bars_drawn - 0.3)
    axes.set_xlabel(f"{metric_label}: method - baseline, mean over paired seeds", fontsize=9)
    title = f"Difference from the baseline in {metric_label}, with 95% CI"
    details = []
    if bars_drawn < total:
        details.append(f"first {bars_drawn} of {total} comparisons")
    if total > 1:
        details.append("intervals not adjusted for multiple comparisons")
    if details:
        title += f"\n({'; '.join(details)})"
    figure.suptitle(title, fontsize=10)
    axes.grid(True, axis="x", alpha=0.3)
    figure.legend(
        handles=[
            Patch(color=ABOVE_ZERO_COLOR, label="CI above 0"),
            Patch(color=BELOW_ZERO_COLOR, label="CI below 0"),
            Patch(color=UNCLEAR_COLOR, label="CI contains 0, or under 2 pairs"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    _save(figure, path)
    return bars_drawn
