"""Tests of the Pareto frontier and that every figure writes a PNG."""

from __future__ import annotations

import numpy as np
import pytest

from harmonizer.evaluation import figures

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG"


def test_pareto_frontier_keeps_undominated_points():
    accuracy = np.array([0.70, 0.75, 0.80, 0.72, 0.85])
    alignment = np.array([0.40, 0.35, 0.30, 0.20, 0.30])

    frontier = figures.pareto_frontier(accuracy, alignment)

    # Point 2 ties point 4 on alignment with lower accuracy, point 3 is beaten by point 1.
    assert frontier.tolist() == [0, 1, 4]


def test_tradeoff_figure_is_written(tmp_path):
    points = [
        figures.TradeoffPoint("resnet50", 0.76, 0.30, 0.01),
        figures.TradeoffPoint("vgg16", 0.71, 0.35, 0.01),
        figures.TradeoffPoint("resnet50 harmonized", 0.77, 0.60, 0.02, baseline="resnet50"),
    ]
    path = tmp_path / "tradeoff.png"

    figures.plot_tradeoff(points, str(path), center_bias_alignment=0.4)

    assert path.read_bytes()[:4] == PNG_SIGNATURE


def test_tradeoff_with_unknown_baseline_is_rejected(tmp_path):
    points = [figures.TradeoffPoint("mine", 0.7, 0.5, baseline="missing")]

    with pytest.raises(ValueError, match="names baseline 'missing'"):
        figures.plot_tradeoff(points, str(tmp_path / "x.png"))


def test_panels_and_curves_are_written(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 16, 16, 3))
    maps = rng.uniform(size=(2, 16, 16))
    panels = tmp_path / "panels.png"
    curves = tmp_path / "curves.png"
    levels = np.logspace(0, 2, 5)

    figures.plot_map_panels(images, maps, maps, str(panels), titles=["a", "b"])
    figures.plot_decision_curves(
        {"model": (levels, np.linspace(0, 1, 5))}, str(curves), human=(levels, levels / 100)
    )

    assert panels.read_bytes()[:4] == PNG_SIGNATURE
    assert curves.read_bytes()[:4] == PNG_SIGNATURE
