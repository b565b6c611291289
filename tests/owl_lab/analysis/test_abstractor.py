"""owl_lab.analysis.abstractor: per-query spatial numbers of abstractor maps on the 3x3 board."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from owl_lab.analysis.abstractor import cell_mass, patch_cells, query_map_stats, specialisation
from owl_lab.synth import Obj, Scene


def test_patch_cells_assigns_patch_centres_to_board_cells():
    cells = patch_cells(8, 8)
    assert cells[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # 3 / 2 / 3 patches per board column
    assert cells[:, 0].tolist() == [0, 0, 0, 3, 3, 6, 6, 6]
    assert torch.bincount(cells.flatten()).tolist() == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert patch_cells(3, 3).flatten().tolist() == list(range(9))
    with pytest.raises(ValueError, match="cannot cover"):
        patch_cells(2, 2)


def _maps(A=1, N=2, H=2, Q=3, g=8):
    return torch.full((A, N, H, Q, g, g), 0.5 / (g * g))  # uniform, patch share 0.5


def test_uniform_map_has_entropy_one_lift_one_and_centred_mass():
    s = query_map_stats(_maps())
    assert len(s) == 6
    np.testing.assert_allclose(s["entropy"], 1.0)
    np.testing.assert_allclose(s["peak_lift"], 1.0)
    np.testing.assert_allclose(s["patch_share"], 0.5)
    np.testing.assert_allclose(s[["com_row", "com_col"]], 0.5)
    assert s["occupied"].isna().all()
    np.testing.assert_allclose(cell_mass(_maps()).sum(-1), 1.0)


def test_point_map_peaks_on_its_cell_and_heads_are_averaged():
    maps = torch.zeros(1, 1, 2, 1, 8, 8)
    maps[0, 0, 0, 0, 7, 0] = 0.8  # head 0: bottom-left patch
    maps[0, 0, 1, 0, 7, 1] = 0.4  # head 1: its neighbour (same board cell 6)
    r = query_map_stats(maps).iloc[0]
    assert (r["peak_cell"], r["peak_row"], r["peak_col"]) == (6, 2, 0)
    assert r["patch_share"] == pytest.approx(0.6) and r["peak_share"] == pytest.approx(1.0)
    assert r["peak_lift"] == pytest.approx(64 / 9)
    p = np.array([2 / 3, 1 / 3])
    assert r["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(64))
    assert r["com_row"] == pytest.approx(7.5 / 8) and r["com_col"] == pytest.approx(
        (0.5 * 2 / 3 + 1.5 / 3) / 8
    )


def test_centre_cell_wins_by_density_not_by_mass():
    maps = torch.full((1, 1, 1, 1, 8, 8), 1.0)
    maps[..., 3:5, 3:5] = 1.3  # the centre cell's 4 patches are denser; corners hold more mass in total
    r = query_map_stats(maps).iloc[0]
    assert r["peak_cell"] == 4 and r["peak_lift"] > 1


def _peaked(peaks):
    """maps whose query j on image i puts all mass on board cell peaks[i][j] (3x3 patch grid)."""
    peaks = np.asarray(peaks)
    maps = torch.zeros(1, *peaks.shape[:1], 1, peaks.shape[1], 3, 3)
    for i, row in enumerate(peaks):
        for j, c in enumerate(row):
            maps[0, i, 0, j, c // 3, c % 3] = 1.0
    return maps


def test_specialisation_tells_fixed_places_from_interchangeable_queries():
    fixed = query_map_stats(_peaked([[0, 4, 8]] * 6))  # every query always at its own cell
    spec = specialisation(fixed, shuffles=50).iloc[0]
    assert spec["consistency"] == 1.0 and spec["consistency_shuffled"] < 0.8 and spec["distinct_cells"] == 3
    assert spec["consistency_p"] < 0.05
    same = query_map_stats(_peaked([[i, i, i] for i in range(6)]))  # all queries at one cell per image
    spec = specialisation(same, shuffles=50).iloc[0]
    assert spec["consistency"] == pytest.approx(spec["consistency_shuffled"]) == pytest.approx(1 / 6)
    assert spec["consistency_p"] == 1.0  # every shuffle is as consistent: no evidence of specialisation


def test_object_hits_use_the_scenes():
    scenes = [
        Scene((Obj("circle", "red", "small", "plain", 0, 0),)),
        Scene((Obj("square", "blue", "small", "plain", 2, 2), Obj("circle", "red", "small", "plain", 1, 1))),
    ]
    stats = query_map_stats(_peaked([[0, 8], [4, 0]]), scenes)
    assert stats["occupied"].tolist() == [1.0, 0.0, 1.0, 0.0]
    spec = specialisation(stats, scenes, shuffles=5).iloc[0]
    assert spec["object_hit"] == 0.5 and spec["object_chance"] == pytest.approx(1.5 / 9)
    assert spec["object_coverage"] == pytest.approx((1 + 0.5) / 2)  # image 1: 1 of its 2 objects is a peak
    with pytest.raises(ValueError, match="scenes"):
        query_map_stats(_peaked([[0, 8], [4, 0]]), scenes[:1])
    with pytest.raises(ValueError, match="grid_h"):
        query_map_stats(torch.zeros(2, 3, 4))


def test_per_image_specialisation_gives_each_images_numbers():
    from owl_lab.analysis.abstractor import per_image_specialisation

    scenes = [
        Scene((Obj("circle", "red", "small", "plain", 0, 0),)),
        Scene((Obj("square", "blue", "small", "plain", 2, 2), Obj("circle", "red", "small", "plain", 1, 1))),
        Scene((Obj("circle", "red", "small", "plain", 0, 0),)),
    ]
    stats = query_map_stats(
        _peaked([[0, 8], [4, 8], [0, 1]]), scenes
    )  # modes: query 0 -> cell 0, query 1 -> 8
    per = per_image_specialisation(stats, scenes)
    assert per["own_cell"].tolist() == [1.0, 0.5, 0.5]
    assert per["object_hit"].tolist() == [0.5, 1.0, 0.5]
    assert per["object_chance"].tolist() == pytest.approx([1 / 9, 2 / 9, 1 / 9])
    assert per["own_cell"].mean() == pytest.approx(
        specialisation(stats, scenes, shuffles=5).iloc[0]["consistency"]
    )
    with pytest.raises(ValueError, match="scenes"):
        per_image_specialisation(stats, scenes[:2])
