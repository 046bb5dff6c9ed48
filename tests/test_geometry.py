"""Sibling geometry against hand-made vectors and numpy; the toy landscapes against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmclab.geometry import (
    FOUR_MINIMA,
    TWO_MINIMA,
    ToyLandscape,
    angle,
    cosine,
    distances,
    plane_determination,
    sibling_angle,
    sibling_geometry,
)
from lmclab.points import distance, norm


def point(w: list[float], b: list[float] | None = None) -> dict[str, torch.Tensor]:
    """A two-tensor point; an integer buffer that every computation must ignore."""
    p = {"w": torch.tensor(w, dtype=torch.float32), "n": torch.tensor(7)}
    if b is not None:
        p["b"] = torch.tensor(b, dtype=torch.float32)
    return p


@pytest.mark.parametrize(
    ("a", "b", "degrees"),
    [
        ([1, 0], [0, 1], 90.0),
        ([1, 0], [1, 1], 45.0),
        ([1, 0], [-1, 0], 180.0),
        ([2, 0], [5, 0], 0.0),
        ([1, 0], [-1, math.sqrt(3)], 120.0),
    ],
)
def test_angle_and_cosine_of_hand_made_vectors(a: list[float], b: list[float], degrees: float) -> None:
    assert angle(point(a), point(b)) == pytest.approx(degrees, abs=1e-5)
    assert angle(point(a), point(b), degrees=False) == pytest.approx(math.radians(degrees), abs=1e-7)
    assert cosine(point(a), point(b)) == pytest.approx(math.cos(math.radians(degrees)), abs=1e-7)


def test_points_are_vectors_over_all_their_tensors() -> None:
    a, b = point([1, 0], [0]), point([0, 0], [2])
    assert angle(a, b) == pytest.approx(90.0)
    assert norm(b) == pytest.approx(2.0) and distance(a, b) == pytest.approx(math.sqrt(5))
    assert math.isnan(angle(a, b, keys=["b"]))  # a's "b" part is zero: undefined, not a number


def test_random_vectors_against_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(5, generator=g)}
    b = {"x": torch.randn(3, 4, generator=g), "y": torch.randn(5, generator=g)}
    va, vb = (np.concatenate([p["x"].numpy().ravel(), p["y"].numpy().ravel()]).astype(np.float64) for p in (a, b))
    cos = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
    assert cosine(a, b) == pytest.approx(cos, rel=1e-12)
    assert angle(a, b) == pytest.approx(np.degrees(np.arccos(cos)), rel=1e-10)
    assert distance(a, b) == pytest.approx(np.linalg.norm(va - vb), rel=1e-12)


def test_tiny_angles_are_resolved() -> None:
    """arccos(cos) returns 0 for an angle of 1e-9 rad; Kahan's formula gets it to float64 accuracy."""
    a = {"v": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"v": torch.tensor([1.0, 1e-9], dtype=torch.float64)}
    assert angle(a, b, degrees=False) == pytest.approx(math.atan(1e-9), rel=1e-6)


def test_sibling_angle_with_origin_and_fork_base() -> None:
    theta_1, theta_2, fork = point([2, 1]), point([1, 2]), point([1, 1])
    assert sibling_angle(theta_1, theta_2) == pytest.approx(math.degrees(math.acos(0.8)))  # cos = 4/5
    assert sibling_angle(theta_1, theta_2, base=fork) == pytest.approx(90.0)
    assert math.isnan(sibling_angle(theta_1, fork, base=fork))  # a sibling at the base: undefined


def test_plane_determination_and_distances() -> None:
    final_1, final_2 = point([3, 0]), point([2, 0])  # θ_1* − θ_2* = (1, 0)
    traj_1 = [point([0, 0]), point([0, 1]), point([1, 1]), point([5, 5])]
    traj_2 = [point([0, 0]), point([0, 0]), point([0, 0]), point([3, 5])]  # differences 0, (0,1), (1,1), (2,0)
    cos = plane_determination(traj_1, traj_2, final_1, final_2)
    assert math.isnan(cos[0])
    assert cos[1:] == pytest.approx([0.0, 1 / math.sqrt(2), 1.0])
    assert distances(iter(traj_1), iter(traj_2)) == pytest.approx([0.0, 1.0, math.sqrt(2), 2.0])


def test_sibling_geometry_in_one_pass_against_numpy() -> None:
    """Every quantity of Singh Figs. 2 and 4b at each t, checked against numpy on the flattened
    parameters (the integer buffer ignored); trajectories are read once (generators)."""
    gen = torch.Generator().manual_seed(0)

    def rand() -> dict[str, torch.Tensor]:
        return point(torch.randn(3, generator=gen).tolist(), torch.randn(2, generator=gen).tolist())

    def vec(p: dict[str, torch.Tensor]) -> np.ndarray:
        return np.concatenate([p["w"].double().numpy(), p["b"].double().numpy()])

    def deg(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1))))

    base = rand()
    traj_1, traj_2 = [base, rand(), rand()], [base, rand(), rand()]
    got = sibling_geometry(iter(traj_1), iter(traj_2), traj_1[-1], traj_2[-1], base)
    final = vec(traj_1[-1]) - vec(traj_2[-1])
    assert len(got) == 3 and math.isnan(got[0].plane_cos) and math.isnan(got[0].angle_fork)
    for g, p1, p2 in zip(got[1:], traj_1[1:], traj_2[1:]):
        d = vec(p1) - vec(p2)
        assert g.distance == pytest.approx(np.linalg.norm(d), rel=1e-12)
        assert g.plane_cos == pytest.approx(d @ final / np.linalg.norm(d) / np.linalg.norm(final), rel=1e-12)
        assert g.angle_origin == pytest.approx(deg(vec(p1), vec(p2)), rel=1e-9)
        assert g.angle_fork == pytest.approx(deg(vec(p1) - vec(base), vec(p2) - vec(base)), rel=1e-9)
    assert [g.distance for g in got] == distances(traj_1, traj_2)
    assert [g.plane_cos for g in got[1:]] == plane_determination(traj_1, traj_2, traj_1[-1], traj_2[-1])[1:]
    assert got[-1].plane_cos == pytest.approx(1.0) and got[0].distance == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        sibling_geometry(traj_1, traj_2[:2], traj_1[-1], traj_2[-1], base)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        distances([point([1, 0])], [point([1, 0]), point([0, 1])])
    with pytest.raises(ValueError, match="different shapes"):
        angle(point([1, 0]), point([1, 0, 0]))
    with pytest.raises(KeyError, match="lacks"):
        cosine(point([1, 0]), point([1, 0]), keys=["w", "missing"])


# ------------------------------------------------------------------------------------ toy landscapes


def second_derivative(toy: ToyLandscape, x: float, h: float = 1e-4) -> float:
    return float((toy.loss(x + h) - 2 * toy.loss(x) + toy.loss(x - h)) / h**2)


def test_toy_loss_is_the_product_of_quadratics() -> None:
    theta = np.linspace(-2, 2, 41)
    assert ToyLandscape(TWO_MINIMA).loss(theta) == pytest.approx((theta**2 - 1) ** 2)
    four = ToyLandscape(FOUR_MINIMA)
    assert four.loss(theta) == pytest.approx((theta**2 - 1) ** 2 * (theta**2 - 2.25) ** 2)
    assert four.loss(list(FOUR_MINIMA)) == pytest.approx([0, 0, 0, 0])


def test_toy_curvature_matches_finite_differences() -> None:
    toy = ToyLandscape(FOUR_MINIMA)
    for m in FOUR_MINIMA:
        assert toy.curvature(m) == pytest.approx(second_derivative(toy, m), rel=1e-5)
    assert ToyLandscape(TWO_MINIMA).curvature(1.0) == 8.0  # L = (θ² − 1)², L″ = 12θ² − 4


def test_two_minima_barrier_and_prediction_closed_forms() -> None:
    toy = ToyLandscape(TWO_MINIMA)
    alpha = np.linspace(0, 1, 11)
    assert toy.barrier_curve(-1, 1, alpha) == pytest.approx(16 * alpha**2 * (1 - alpha) ** 2)
    assert toy.barrier(-1, 1) == pytest.approx((1.0, 0.5))
    assert toy.prediction(-1, 1, alpha) == pytest.approx(16 * alpha * (1 - alpha))  # d² = 4, L″ = 8 at both


def test_four_minima_barriers_against_closed_form_and_brute_force() -> None:
    toy = ToyLandscape(FOUR_MINIMA)
    assert toy.adjacent_pairs() == [(-1.5, -1.0), (-1.0, 1.0), (1.0, 1.5)]
    assert toy.barrier(-1, 1) == pytest.approx((2.25**2, 0.5))  # L(0) = 1 · 2.25²
    grid = np.linspace(0, 1, 200_001)
    for a, b in toy.adjacent_pairs():
        height, at = toy.barrier(a, b)
        curve = toy.barrier_curve(a, b, grid)
        assert height == pytest.approx(curve.max(), rel=1e-9)
        assert at == pytest.approx(grid[curve.argmax()], abs=1e-5)
    # mirror symmetry: the outer pairs have the same barrier at mirrored α
    assert toy.barrier(-1.5, -1)[0] == pytest.approx(toy.barrier(1, 1.5)[0])
    assert toy.barrier(-1.5, -1)[1] == pytest.approx(1 - toy.barrier(1, 1.5)[1])
    # hierarchy: the distant pair is separated by a higher barrier than the near ones
    assert toy.barrier(-1, 1)[0] > 30 * toy.barrier(1, 1.5)[0]


def test_prediction_is_the_weighted_pair_of_taylor_models() -> None:
    """Prop. 1 = (1−α)·[½α²d²L″(a)] + α·[½(1−α)²d²L″(b)], with L″ from finite differences."""
    toy = ToyLandscape(FOUR_MINIMA)
    alpha = np.linspace(0, 1, 9)
    assert toy.prediction(-1, 1, alpha) == pytest.approx(25 * alpha * (1 - alpha))  # L″(±1) = 12.5, d² = 4
    for a, b in toy.adjacent_pairs():
        d2 = (b - a) ** 2
        taylor = (1 - alpha) * 0.5 * alpha**2 * d2 * second_derivative(toy, a) + alpha * 0.5 * (
            1 - alpha
        ) ** 2 * d2 * second_derivative(toy, b)
        assert toy.prediction(a, b, alpha) == pytest.approx(taylor, rel=1e-5, abs=1e-9)


def test_toy_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        ToyLandscape((1.0, 1.0))
    with pytest.raises(ValueError, match="not a minimum"):
        ToyLandscape(TWO_MINIMA).prediction(-1, 0.5, [0.5])
