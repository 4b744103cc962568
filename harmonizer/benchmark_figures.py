"""PNG figures of the CPU benchmarks (needs matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import os

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harmonizer import saliency  # noqa: E402

EXAMPLES_PER_FIGURE = 6
FIGURE_DPI = 110


def _saliency(model: keras.Model, images: np.ndarray, labels: np.ndarray, definition: str):
    return saliency.saliency_maps(model, images.astype(np.float32), labels, definition).numpy()


def saliency_grid(
    images: np.ndarray,
    maps: np.ndarray,
    labels: np.ndarray,
    models: dict[str, keras.Model],
    path: str,
    title: str,
) -> str:
    """Plot images, maps, and each model's abs_max and signed_mean saliency (inference mode)."""
    rows = [("image", None, None), ("map", None, None)]
    for name in models:
        rows.append((f"{name}\n|grad| max", name, saliency.ABS_MAX))
        rows.append((f"{name}\nsigned mean", name, saliency.SIGNED_MEAN))
    count = len(images)
    figure, axes = plt.subplots(len(rows), count, figsize=(1.5 * count, 1.45 * len(rows)))
    computed = {
        (name, definition): _saliency(models[name], images, labels, definition)
        for _, name, definition in rows
        if name is not None
    }
    for row, (label, name, definition) in enumerate(rows):
        for column in range(count):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if label == "image":
                axis.imshow(images[column].astype(np.uint8))
            elif label == "map":
                axis.imshow(maps[column], cmap="gray", vmin=0, vmax=1)
            elif definition == saliency.ABS_MAX:
                axis.imshow(computed[(name, definition)][column], cmap="magma")
            else:
                values = computed[(name, definition)][column]
                limit = np.abs(values).max() or 1.0
                axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
            if column == 0:
                axis.set_ylabel(label, fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def _bar_panel(axis, summary: list[dict], key: str, title: str) -> None:
    labels = [f"{e['variant']}\n{e['coverage']:.0%} maps" for e in summary]
    means = [e[key] for e in summary]
    spreads = [e[f"{key}_std"] for e in summary]
    axis.bar(range(len(summary)), means, yerr=spreads, capsize=3, color="tab:blue")
    axis.set_xticks(range(len(summary)))
    axis.set_xticklabels(labels, fontsize=7)
    axis.set_title(title, fontsize=9)
    axis.axhline(0.0, color="black", linewidth=0.5)


def shortcut_figures(
    summary, models, train, test, directory: str, prefix: str = "shortcut"
) -> list[str]:
    """Write the shortcut benchmark's bar chart and saliency examples; return the paths.

    The files are ``<prefix>_summary.png`` and ``<prefix>_saliency.png``.
    """
    del train  # The examples come from the test split, where the patch is random.
    paths = []

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _bar_panel(axes[0], summary, "accuracy", "test top-1 (patch random)")
    _bar_panel(axes[1], summary, "abs_max/inference", "alignment, |grad| max (inference)")
    _bar_panel(axes[2], summary, "signed_mean/inference", "alignment, signed mean (inference)")
    figure.suptitle("Shortcut benchmark: mean and sample std over seeds", fontsize=10)
    figure.tight_layout()
    path = os.path.join(directory, f"{prefix}_summary.png")
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    paths.append(path)

    full_coverage = {variant: m for (variant, coverage), m in models.items() if coverage == 1.0}
    count = EXAMPLES_PER_FIGURE
    paths.append(
        saliency_grid(
            test.images[:count],
            test.maps[:count],
            test.labels[:count],
            full_coverage,
            os.path.join(directory, f"{prefix}_saliency.png"),
            "Shortcut test images (patch colour random): saliency of each variant, seed 0",
        )
    )
    return paths


def psychophysics_plot(reports: dict[str, dict], path: str, title: str) -> str:
    """Plot the raw accuracy curve of each psychophysics report against the revealed share."""
    figure, axis = plt.subplots(figsize=(5, 3.4))
    for name, report in reports.items():
        axis.plot(report["levels_percent"], report["accuracy"], marker="o", label=name)
    axis.set_xscale("log")
    axis.set_xlabel("pixels revealed (%), top of the silhouette map first")
    axis.set_ylabel("animal / non-animal accuracy")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path
