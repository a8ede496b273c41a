"""One-pass reward modelling (Li et al. 2025): a linear preference head learned online in O(d^2).

Why: a reward service that learns from preference messages as they arrive cannot re-fit a
logistic regression on its whole history after each label (O(t d^2) time, O(t d) memory). Online
mirror descent with the local norm of the accumulated Hessian reaches the same accuracy while
keeping only theta and one d x d matrix.

Model: P(a > a' | x) = sigmoid(theta . z), z = phi(x, a) - phi(x, a') with phi a frozen feature
map; the reward of a single answer is theta . phi(x, a).

Update for a labelled pair (z_t, y_t), y_t = 1 when a was preferred (docs/algorithms.md):
    g_t = (sigmoid(z_t.theta_t) - y_t) z_t
    Ht~ = H_t + eta sigmoid'(z_t.theta_t) z_t z_t^T
    theta' = theta_t - eta Ht~^-1 g_t
    theta_{t+1} = argmin_{||theta|| <= B} ||theta - theta'||_{Ht~}
    H_{t+1} = H_t + sigmoid'(z_t.theta_{t+1}) z_t z_t^T,   H_1 = lambda I
Only A_t = H_t^-1 is stored. Both rank-one changes are Sherman-Morrison updates, and Ht~^-1 is
only ever applied to vectors (as A_t minus a rank-one term), so an update costs O(d^2).

Projection. When ||theta'|| > B the minimiser is theta(mu) = (I + mu Ht~^-1)^-1 theta' for the
Lagrange multiplier mu > 0 with ||theta(mu)|| = B. Instead of an O(d^3) eigendecomposition we
build a Lanczos basis of the Krylov space of Ht~^-1 started at theta' (shift invariance: the same
basis gives theta(mu) for every mu) and solve the 1-D equation 1/||theta(mu)|| = 1/B in it by
Newton's method, which converges monotonically from mu = 0 because 1/||theta(mu)|| is concave
(More & Sorensen's secular equation). Lanczos stops once the residual of the shifted system is
below 1e-10 ||theta'||, so the result is the exact projection to that tolerance; tests compare it
with an eigendecomposition and bisection. Cost O(m d^2), m the (small) number of Lanczos steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from asyncrlhf.api import OnePassHead

PROJECTION_TOL = 1e-10
MAX_LANCZOS_STEPS = 64


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def sigmoid_prime(x):
    s = sigmoid(x)
    return s * (1.0 - s)


# ---------------------------------------------------------------------------------------------
# Shared read-out


class _LinearHead:
    theta: np.ndarray

    def score(self, features) -> np.ndarray:
        """Reward theta . phi for each row of `features` [n, d] (or one [d] vector)."""
        return np.asarray(features, dtype=np.float64) @ self.theta

    def preference_probability(self, z) -> np.ndarray:
        """P(first answer preferred) = sigmoid(theta . z) for z = phi(a) - phi(a')."""
        return sigmoid(self.score(z))

    def accuracy(self, z, y) -> float:
        """Fraction of pairs whose label the head predicts (ties count as wrong)."""
        pred = self.score(z)
        return float(np.mean((pred > 0) == (np.asarray(y) > 0.5)) if len(pred) else 0.0)


# ---------------------------------------------------------------------------------------------
# One-pass online mirror descent


@dataclass
class OnePassRewardHead(_LinearHead):
    """Linear preference head learned by one-pass online mirror descent (O(d^2) per label)."""

    dim: int
    lam: float = 1.0
    bound: float = 10.0
    eta: float = 1.0
    theta: np.ndarray = field(init=False)
    h_inv: np.ndarray = field(init=False)  # A_t = H_t^-1
    updates: int = field(default=0, init=False)
    projections: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.lam <= 0 or self.bound <= 0 or self.eta <= 0:
            raise ValueError(
                f"one-pass head needs dim >= 1 and positive lambda, bound, eta; got dim={self.dim} "
                f"lambda={self.lam} bound={self.bound} eta={self.eta}"
            )
        self.theta = np.zeros(self.dim)
        self.h_inv = np.eye(self.dim) / self.lam

    @classmethod
    def from_spec(cls, spec: "OnePassHead", dim: int) -> "OnePassRewardHead":
        return cls(dim=dim, lam=spec.lambda_, bound=spec.bound, eta=spec.eta)

    def update(self, z, y: float) -> None:
        """Learn from one labelled pair: y = 1 when the first answer (phi(a) in z) was preferred."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != (self.dim,):
            raise ValueError(f"feature difference has shape {z.shape}, expected ({self.dim},)")
        a_z = self.h_inv @ z  # the one O(d^2) product with A_t this update needs
        z_a_z = float(z @ a_z)
        margin = float(z @ self.theta)
        # Ht~^-1 = A - c (Az)(Az)^T / (1 + c z.Az), c = eta sigmoid'(margin)
        c = self.eta * sigmoid_prime(margin)
        shrink = 1.0 / (1.0 + c * z_a_z)
        step = self.eta * (sigmoid(margin) - y) * shrink  # Ht~^-1 z = shrink * Az
        theta_p = self.theta - step * a_z
        if np.linalg.norm(theta_p) > self.bound:
            theta_p = self._project(theta_p, a_z, c * shrink)
            self.projections += 1
        self.theta = theta_p
        # H_{t+1} = H_t + w z z^T with w = sigmoid'(z . theta_{t+1}); A_t z is still current
        w = sigmoid_prime(float(z @ self.theta))
        _rank_one_update_(self.h_inv, a_z, -w / (1.0 + w * z_a_z))
        self.updates += 1

    def _project(self, theta_p: np.ndarray, a_z: np.ndarray, coef: float) -> np.ndarray:
        def apply_inverse(v: np.ndarray) -> np.ndarray:  # Ht~^-1 v without forming it
            return self.h_inv @ v - coef * float(a_z @ v) * a_z

        return project_in_local_norm(apply_inverse, theta_p, self.bound)

    def uncertainty(self, z) -> np.ndarray:
        """||z||_{H_t^-1} for each candidate row of z [n, d]: the active-learning criterion."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
        return np.sqrt(np.einsum("nd,nd->n", z @ self.h_inv, z))

    def select(self, candidates) -> int:
        """Index of the candidate pair (rows of z) the head is most uncertain about."""
        return int(np.argmax(self.uncertainty(candidates)))

    def deployment_pair(self, features, bonus: float = 1.0) -> tuple[int, int]:
        """Deployment-time adaptation (Li et al. 2025): of n candidate answers (rows of φ, [n, d]),
        serve the first greedily, a = argmax θ·φ(a), and the second optimistically,
        a' = argmax_{a' ≠ a} θ·φ(a') + ν ‖φ(a') − φ(a)‖_{H⁻¹} (ν = `bonus`): an answer that is good
        by the current estimate or whose comparison with the first is uncertain. ν = 0 is greedy
        (top two), large ν approaches pure uncertainty (`select`)."""
        phi = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if len(phi) < 2:
            raise ValueError("deployment-time adaptation needs at least two candidate answers")
        if bonus < 0:
            raise ValueError(f"the exploration bonus must be >= 0, got {bonus}")
        reward = phi @ self.theta
        first = int(np.argmax(reward))
        optimistic = reward + bonus * self.uncertainty(phi - phi[first])
        optimistic[first] = -np.inf
        return first, int(np.argmax(optimistic))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays for np.savez (no pickle)."""
        return {"theta": self.theta.copy(), "h_inv": self.h_inv.copy(),
                "counts": np.array([self.updates, self.projections])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state["theta"].shape != (self.dim,):
            raise ValueError(f"state is for dim {state['theta'].shape[0]}, this head has dim {self.dim}")
        self.theta, self.h_inv = state["theta"].copy(), state["h_inv"].copy()
        self.updates, self.projections = (int(x) for x in state["counts"])


def _rank_one_update_(matrix: np.ndarray, v: np.ndarray, coef: float) -> None:
    """matrix += coef v v^T in place. numpy has no in-place outer-product update (it builds a
    d x d temporary, ~6x slower at d=1024); torch's addr_ on a view of the same memory is BLAS ger."""
    torch.from_numpy(matrix).addr_(torch.from_numpy(v), torch.from_numpy(v), alpha=coef)


def project_in_local_norm(apply_inverse, theta_p: np.ndarray, bound: float) -> np.ndarray:
    """argmin_{||x|| <= bound} ||x - theta_p||_H given v -> H^-1 v (H SPD), by Lanczos + Newton."""
    beta0 = float(np.linalg.norm(theta_p))
    if beta0 <= bound:
        return theta_p
    basis = [theta_p / beta0]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(MAX_LANCZOS_STEPS, theta_p.shape[0])):
        v = basis[-1]
        w = apply_inverse(v)
        alphas.append(float(v @ w))
        w -= alphas[-1] * v + (betas[-1] * basis[-2] if betas else 0.0)
        stacked = np.array(basis)
        for _ in range(2):  # full re-orthogonalisation: O(m d), cheap next to the O(d^2) product
            w -= stacked.T @ (stacked @ w)
        beta = float(np.linalg.norm(w))
        y = _krylov_solution(np.array(alphas), np.array(betas), beta0, bound)
        mu_residual = beta * abs(y.coef[-1]) * y.mu  # ||(I + mu H^-1) x - theta_p||
        if beta <= PROJECTION_TOL * beta0 or mu_residual <= PROJECTION_TOL * beta0:
            break
        betas.append(beta)
        basis.append(w / beta)
    x = np.array(basis[: len(y.coef)]).T @ y.coef
    norm = float(np.linalg.norm(x))
    return x * min(1.0, bound / norm)  # rounding can leave x a hair outside the ball


@dataclass
class _KrylovSolution:
    coef: np.ndarray
    mu: float


def _krylov_solution(alphas: np.ndarray, betas: np.ndarray, beta0: float, bound: float) -> _KrylovSolution:
    """Solve (I + mu T) c = beta0 e1 with ||c|| = bound, T the Lanczos tridiagonal matrix."""
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    evals, evecs = np.linalg.eigh(t)
    evals = np.maximum(evals, 0.0)  # T is SPD up to rounding
    a = beta0 * evecs[0]  # e1 in the eigenbasis, scaled
    mu = 0.0
    for _ in range(100):  # Newton on psi(mu) = 1/||c(mu)||: concave, monotone from mu = 0
        d = 1.0 + mu * evals
        sq = float(np.sum(a**2 / d**2))
        psi = sq**-0.5
        dpsi = sq**-1.5 * float(np.sum(a**2 * evals / d**3))
        if dpsi <= 0:
            break
        step = (1.0 / bound - psi) / dpsi
        mu += step
        if abs(step) <= 1e-14 * max(mu, 1.0):
            break
    coef = evecs @ (a / (1.0 + mu * evals))
    return _KrylovSolution(coef=coef, mu=mu)


# ---------------------------------------------------------------------------------------------
# Maximum-likelihood baseline


@dataclass
class LogisticMLE(_LinearHead):
    """The baseline: re-fit L2-regularised logistic regression on the whole history.

    Not used in training: it is what the one-pass head is measured against (tests/test_onepass.py
    checks the one-pass accuracy is within a point of it; bench/onepass_bench.py times both).
    Minimises sum_s logloss(z_s, y_s) + lambda/2 ||theta||^2 (lambda I matches the one-pass H_1)
    with Newton steps warm-started from the previous fit: O(t d^2 + d^3) time and O(t d) memory
    per refit, which is the cost the one-pass head avoids.
    """

    dim: int
    lam: float = 1.0
    newton_steps: int = 2
    theta: np.ndarray = field(init=False)
    _z: np.ndarray = field(init=False, repr=False)
    _y: np.ndarray = field(init=False, repr=False)
    count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.theta = np.zeros(self.dim)
        self._z = np.empty((16, self.dim))
        self._y = np.empty(16)

    def add(self, z, y: float) -> None:
        """Store a pair without refitting (grows the history geometrically)."""
        if self.count == len(self._y):
            self._z = np.concatenate([self._z, np.empty_like(self._z)])
            self._y = np.concatenate([self._y, np.empty_like(self._y)])
        self._z[self.count], self._y[self.count] = z, y
        self.count += 1

    def update(self, z, y: float) -> None:
        """The online MLE protocol: store the pair, refit on everything."""
        self.add(z, y)
        self.refit()

    def refit(self, steps: int | None = None) -> None:
        """Damped Newton steps (Armijo backtracking: plain Newton diverges from a far warm start)."""
        z, y = self._z[: self.count], self._y[: self.count]
        for _ in range(self.newton_steps if steps is None else steps):
            p = sigmoid(z @ self.theta)
            grad = z.T @ (p - y) + self.lam * self.theta
            hess = (z * (p * (1.0 - p))[:, None]).T @ z + self.lam * np.eye(self.dim)
            direction = np.linalg.solve(hess, grad)
            self.theta = self._backtrack(z, y, direction, float(grad @ direction))

    def _objective(self, z: np.ndarray, y: np.ndarray, theta: np.ndarray) -> float:
        margin = z @ theta
        return float(np.sum(np.logaddexp(0.0, margin) - y * margin) + 0.5 * self.lam * theta @ theta)

    def _backtrack(self, z: np.ndarray, y: np.ndarray, direction: np.ndarray, decrease: float) -> np.ndarray:
        current, step = self._objective(z, y, self.theta), 1.0
        for _ in range(30):
            candidate = self.theta - step * direction
            if self._objective(z, y, candidate) <= current - 1e-4 * step * decrease:
                return candidate
            step *= 0.5
        return self.theta
