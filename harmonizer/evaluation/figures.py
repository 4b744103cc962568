"""PNG figures of evaluations: accuracy-alignment trade-off, map panels and decision curves.

matplotlib is an optional extra (`pip install matplotlib`); every function here imports it
when called and raises an `ImportError` naming the package when it is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FIGURE_DPI = 150
PANEL_SIZE_INCHES = 2.0


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "figures need matplotlib, an optional extra: pip install matplotlib"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


@dataclasses.dataclass(frozen=True)
class TradeoffPoint:
    """One model in the accuracy-alignment scatter.

    Attributes:
        name: label shown next to the point.
        accuracy: ImageNet top-1 accuracy in [0, 1].
        alignment: mean Spearman's rho divided by the human ceiling.
        alignment_std: bootstrap standard deviation of `alignment` (error bar), or 0.
        baseline: name of the unharmonized model this one was trained from, or None. An arrow
            is drawn from that model to this one. Only models without a baseline define the
            Pareto frontier.
    """

    name: str
    accuracy: float
    alignment: float
    alignment_std: float = 0.0
    baseline: str | None = None


def pareto_frontier(accuracy: np.ndarray, alignment: np.ndarray) -> np.ndarray:
    """Return the indices of the points no other point beats on both axes, by accuracy.

    A point is on the frontier when no other point has higher-or-equal accuracy and alignment
    with at least one strictly higher.
    """
    accuracy = np.asarray(accuracy, np.float64)
    alignment = np.asarray(alignment, np.float64)
    frontier = []
    for index in range(len(accuracy)):
        at_least = (accuracy >= accuracy[index]) & (alignment >= alignment[index])
        better = (accuracy > accuracy[index]) | (alignment > alignment[index])
        if not np.any(at_least & better):
            frontier.append(index)
    return np.array(sorted(frontier, key=lambda i: accuracy[i]), dtype=int)


def plot_tradeoff(
    points: Sequence[TradeoffPoint],
    path: str,
    title: str = "Accuracy vs. human feature alignment",
    center_bias_alignment: float | None = None,
) -> None:
    """Draw the accuracy-alignment scatter with the Pareto frontier and harmonization arrows.

    Raises:
        ValueError: if a point names a baseline that is not among the points.
    """
    pyplot = _pyplot()
    by_name = {point.name: point for point in points}
    for point in points:
        if point.baseline is not None and point.baseline not in by_name:
            raise ValueError(
                f"point {point.name!r} names baseline {point.baseline!r}, which is not among the "
                f"points {sorted(by_name)}"
            )
    figure, axes = pyplot.subplots(figsize=(6, 4.5))

    baselines = [point for point in points if point.baseline is None]
    if baselines:
        accuracy = np.array([p.accuracy for p in baselines])
        alignment = np.array([p.alignment for p in baselines])
        frontier = pareto_frontier(accuracy, alignment)
        # Shade the region the unharmonized models reach: below and left of the frontier.
        steps_x = np.concatenate([[0.0], accuracy[frontier]])
        steps_y = np.concatenate([alignment[frontier], [0.0]])
        axes.fill_between(steps_x, 0.0, steps_y, step="post", color="0.9", label="Pareto region")
        axes.step(steps_x, steps_y, where="post", color="0.6", linewidth=1)

    for point in points:
        harmonized = point.baseline is not None
        axes.errorbar(
            point.accuracy,
            point.alignment,
            yerr=point.alignment_std,
            fmt="o",
            color="tab:red" if harmonized else "tab:blue",
            markersize=5,
            capsize=2,
        )
        axes.annotate(
            point.name,
            (point.accuracy, point.alignment),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
        if harmonized:
            start = by_name[point.baseline]
            axes.annotate(
                "",
                xy=(point.accuracy, point.alignment),
                xytext=(start.accuracy, start.alignment),
                arrowprops={"arrowstyle": "->", "color": "tab:red"},
            )
    if center_bias_alignment is not None:
        axes.axhline(
            center_bias_alignment,
            color="0.4",
            linestyle="--",
            linewidth=1,
            label="center-bias baseline",
        )

    all_accuracy = [p.accuracy for p in points]
    all_alignment = [p.alignment for p in points]
    margin = 0.05
    axes.set_xlim(min(all_accuracy) - margin, max(all_accuracy) + margin)
    axes.set_ylim(min(0.0, min(all_alignment)), max(all_alignment) + margin)
    axes.set_xlabel("ImageNet top-1 accuracy")
    axes.set_ylabel("Human feature alignment (rho / ceiling)")
    axes.set_title(title)
    axes.legend(loc="best", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    pyplot.close(figure)


def plot_map_panels(
    images: np.ndarray,
    human_maps: np.ndarray,
    saliency_maps: np.ndarray,
    path: str,
    titles: Sequence[str] | None = None,
) -> None:
    """Draw one row per example: the image, its importance map and the model's saliency.

    Args:
        images: [N, H, W, 3] RGB in [0, 255].
        human_maps: [N, H, W].
        saliency_maps: [N, H, W].
        path: output PNG path.
        titles: optional per-row titles.
    """
    pyplot = _pyplot()
    count = len(images)
    figure, axes = pyplot.subplots(
        count, 3, figsize=(3 * PANEL_SIZE_INCHES, count * PANEL_SIZE_INCHES), squeeze=False
    )
    for row in range(count):
        panels = (
            (np.clip(images[row], 0, 255).astype(np.uint8), None, "image"),
            (human_maps[row], "viridis", "importance map"),
            (saliency_maps[row], "inferno", "model saliency"),
        )
        for column, (panel, colormap, label) in enumerate(panels):
            axes[row, column].imshow(panel, cmap=colormap)
            axes[row, column].set_axis_off()
            heading = label if titles is None or column else f"{titles[row]}\n{label}"
            axes[row, column].set_title(heading, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    pyplot.close(figure)


def plot_decision_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str,
    human: tuple[np.ndarray, np.ndarray] | None = None,
    ylabel: str = "Normalized accuracy",
) -> None:
    """Draw decision curves (accuracy against the percentage of revealed pixels, log axis).

    Args:
        curves: model name -> (levels in percent, accuracy).
        path: output PNG path.
        human: optional (levels, accuracy) of humans, drawn in black.
        ylabel: the y-axis label.
    """
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(figsize=(5, 3.5))
    for name, (levels, accuracy) in curves.items():
        axes.plot(levels, accuracy, marker="o", markersize=3, label=name)
    if human is not None:
        axes.plot(human[0], human[1], color="black", linewidth=2, label="humans")
    axes.set_xscale("log")
    axes.set_xlabel("Revealed pixels (%)")
    axes.set_ylabel(ylabel)
    axes.legend(loc="best", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    pyplot.close(figure)


def read_tradeoff_csv(path: str) -> list[TradeoffPoint]:
    """Read `name,accuracy,alignment[,alignment_std][,baseline]` rows.

    Raises:
        ValueError: for missing columns or an empty file.
    """
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        missing = {"name", "accuracy", "alignment"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"trade-off CSV {path!r} lacks columns {sorted(missing)}")
        points = [
            TradeoffPoint(
                name=row["name"],
                accuracy=float(row["accuracy"]),
                alignment=float(row["alignment"]),
                alignment_std=float(row.get("alignment_std") or 0.0),
                baseline=row.get("baseline") or None,
            )
            for row in reader
        ]
    if not points:
        raise ValueError(f"trade-off CSV {path!r} has no rows")
    return points


def plot_tradeoff_csv(path: str, figures_dir: str) -> str:
    """Draw `tradeoff.png` in `figures_dir` from a trade-off CSV and return its path."""
    output = os.path.join(figures_dir, "tradeoff.png")
    plot_tradeoff(read_tradeoff_csv(path), output)
    return output
