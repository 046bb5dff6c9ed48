"""Singh et al. Fig. 6: one-dimensional toy landscapes L(θ) = Π_i (θ − m_i)².

Each m_i is a global minimum (L = 0). Between two minima a < b the barrier curve is exactly
B(α) = L((1−α)a + αb) (both endpoint losses are 0), a polynomial in α whose maximum is found from
the real roots of B′. Prop. 1 predicts B(α) ≈ α(1−α)/2 · d²(α L″(a) + (1−α) L″(b)), d = b − a, with
the closed form L″(m_j) = 2 Π_{i≠j} (m_j − m_i)² at a minimum. For the two minima ±1:
B(α) = 16α²(1−α)² (height 1) against the prediction 16α(1−α) (height 4): the second-order model
misses the quartic's higher-order terms, which grow with the distance between the minima.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.polynomial import Polynomial

from lmclab.curvature.predictions import predicted_barrier_curve

__all__ = ["FOUR_MINIMA", "TWO_MINIMA", "ToyLandscape"]

TWO_MINIMA: tuple[float, ...] = (-1.0, 1.0)
FOUR_MINIMA: tuple[float, ...] = (-1.5, -1.0, 1.0, 1.5)


@dataclass(frozen=True)
class ToyLandscape:
    """L(θ) = Π_i (θ − m_i)² for distinct minima m_i."""

    minima: tuple[float, ...]

    def __post_init__(self) -> None:
        m = tuple(float(x) for x in self.minima)
        if len(m) < 2 or len(set(m)) != len(m) or not all(np.isfinite(m)):
            raise ValueError(f"need at least two distinct finite minima, got {self.minima!r}")
        object.__setattr__(self, "minima", tuple(sorted(m)))

    @property
    def polynomial(self) -> Polynomial:
        return Polynomial.fromroots(self.minima) ** 2

    def loss(self, theta: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Π_i (θ − m_i)², elementwise."""
        t = np.asarray(theta, dtype=np.float64)
        return np.prod([(t - m) ** 2 for m in self.minima], axis=0)

    def curvature(self, minimum: float) -> float:
        """L″(m_j) = 2 Π_{i≠j} (m_j − m_i)² (closed form; only at a minimum)."""
        j = self._index(minimum)
        return 2.0 * float(np.prod([(self.minima[j] - m) ** 2 for i, m in enumerate(self.minima) if i != j]))

    def adjacent_pairs(self) -> list[tuple[float, float]]:
        """Neighbouring minima (m_i, m_{i+1}), left to right."""
        return list(zip(self.minima[:-1], self.minima[1:]))

    def barrier_curve(self, theta_1: float, theta_2: float, alphas: Sequence[float] | np.ndarray) -> np.ndarray:
        """Exact B(α) = L((1−α)θ_1 + αθ_2) − [(1−α)L(θ_1) + αL(θ_2)]."""
        a = np.asarray(alphas, dtype=np.float64)
        l1, l2 = self.loss(theta_1), self.loss(theta_2)
        return self.loss((1 - a) * theta_1 + a * theta_2) - ((1 - a) * l1 + a * l2)

    def barrier(self, theta_1: float, theta_2: float) -> tuple[float, float]:
        """(max_α B(α), argmax α) over α ∈ [0, 1], from the critical points of the polynomial B(α)."""
        curve = self._barrier_polynomial(theta_1, theta_2)
        roots = curve.deriv().roots()
        real = roots.real[np.abs(roots.imag) < 1e-9]
        candidates = np.concatenate([[0.0, 1.0], real[(real >= 0) & (real <= 1)]])
        values = curve(candidates)
        i = int(np.argmax(values))
        return float(values[i]), float(candidates[i])

    def prediction(self, theta_1: float, theta_2: float, alphas: Sequence[float] | np.ndarray) -> np.ndarray:
        """Prop. 1: α(1−α)/2 · d²(α L″(θ_1) + (1−α) L″(θ_2)), d = θ_2 − θ_1 (both endpoints minima)."""
        d2 = (float(theta_2) - float(theta_1)) ** 2
        return predicted_barrier_curve(d2 * self.curvature(theta_1), d2 * self.curvature(theta_2), alphas)

    def _barrier_polynomial(self, theta_1: float, theta_2: float) -> Polynomial:
        along = self.polynomial(Polynomial([theta_1, theta_2 - theta_1]))  # L(θ_1 + α d) as a polynomial in α
        l1, l2 = float(self.loss(theta_1)), float(self.loss(theta_2))
        return along - Polynomial([l1, l2 - l1])

    def _index(self, minimum: float) -> int:
        for j, m in enumerate(self.minima):
            if np.isclose(m, minimum, rtol=0, atol=1e-12):
                return j
        raise ValueError(f"{minimum!r} is not a minimum of this landscape; minima: {list(self.minima)}")
