"""The one-pass reward head against a dense reference, an exact projection, and the MLE baseline."""

from __future__ import annotations

import numpy as np
import pytest

from asyncrlhf.onepass import (
    LogisticMLE,
    OnePassRewardHead,
    project_in_local_norm,
    sigmoid,
    sigmoid_prime,
)


def bradley_terry(d: int, n: int, norm: float, rng: np.random.Generator, theta=None):
    """Feature differences z ~ N(0, I) and labels y ~ Bernoulli(sigmoid(theta* . z)), ||theta*|| = norm."""
    if theta is None:
        theta = rng.standard_normal(d)
        theta *= norm / np.linalg.norm(theta)
    z = rng.standard_normal((n, d))
    y = (rng.random(n) < sigmoid(z @ theta)).astype(float)
    return theta, z, y


def reference_projection(h: np.ndarray, theta_p: np.ndarray, bound: float) -> np.ndarray:
    """Exact projection: eigendecomposition, then bisection on the multiplier mu of
    x(mu) = (H + mu I)^-1 H theta_p, whose norm falls monotonically from ||theta_p|| to 0."""
    if np.linalg.norm(theta_p) <= bound:
        return theta_p
    evals, q = np.linalg.eigh(h)
    c = q.T @ theta_p
    x = lambda mu: q @ (evals / (evals + mu) * c)  # noqa: E731
    lo, hi = 0.0, 1.0
    while np.linalg.norm(x(hi)) > bound:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.linalg.norm(x(mid)) > bound else (lo, mid)
    return x(hi)


def test_update_matches_a_dense_reference_of_the_paper_equations():
    # Dense O(d^3) transcription of the update (docs/algorithms.md); bound 1 < ||theta*|| = 3 so
    # that the projection is active on many steps.
    d, lam, bound, eta = 8, 0.5, 1.0, 1.0
    rng = np.random.default_rng(0)
    _, zs, ys = bradley_terry(d, 60, 3.0, rng)
    head = OnePassRewardHead(dim=d, lam=lam, bound=bound, eta=eta)
    h, theta = lam * np.eye(d), np.zeros(d)
    for z, y in zip(zs, ys):
        h_tilde = h + eta * sigmoid_prime(z @ theta) * np.outer(z, z)
        theta_p = theta - eta * np.linalg.solve(h_tilde, (sigmoid(z @ theta) - y) * z)
        theta = reference_projection(h_tilde, theta_p, bound)
        h = h + sigmoid_prime(z @ theta) * np.outer(z, z)
        head.update(z, y)
        np.testing.assert_allclose(head.theta, theta, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(head.h_inv, np.linalg.inv(h), rtol=1e-7, atol=1e-10)
    assert head.projections > 10 and np.linalg.norm(head.theta) <= bound * (1 + 1e-12)


@pytest.mark.parametrize("scale", [1.5, 10.0, 1000.0])
def test_projection_matches_eigendecomposition_and_bisection(scale):
    d, bound = 40, 1.0
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    h = q @ np.diag(np.logspace(0, 4, d)) @ q.T  # condition number 1e4, as a long stream makes it
    theta_p = rng.standard_normal(d)
    theta_p *= scale * bound / np.linalg.norm(theta_p)
    got = project_in_local_norm(lambda v: np.linalg.solve(h, v), theta_p, bound)
    want = reference_projection(h, theta_p, bound)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert np.linalg.norm(got) <= bound * (1 + 1e-12)


def test_projection_leaves_points_inside_the_ball_alone():
    theta_p = np.array([0.3, -0.4])
    assert project_in_local_norm(lambda v: v, theta_p, 1.0) is theta_p


def test_one_pass_accuracy_is_within_one_point_of_mle():
    rng = np.random.default_rng(2)
    theta_star, z, y = bradley_terry(64, 3000, 2.0, rng)
    _, z_test, y_test = bradley_terry(64, 20_000, 2.0, rng, theta=theta_star)
    head, mle = OnePassRewardHead(dim=64), LogisticMLE(dim=64)
    for zi, yi in zip(z, y):
        head.update(zi, yi)
        mle.add(zi, yi)
    mle.refit(steps=20)  # the MLE on the whole history, to convergence
    one_pass, batch = head.accuracy(z_test, y_test), mle.accuracy(z_test, y_test)
    bayes = float(np.mean((z_test @ theta_star > 0) == (y_test > 0.5)))
    assert batch > 0.75 and bayes - batch < 0.02  # the baseline itself learned
    assert abs(one_pass - batch) <= 0.01, (one_pass, batch)


def test_online_mle_refit_converges_to_the_regularised_optimum():
    rng = np.random.default_rng(3)
    _, z, y = bradley_terry(5, 400, 1.0, rng)
    mle = LogisticMLE(dim=5, lam=2.0)
    for zi, yi in zip(z, y):
        mle.update(zi, yi)  # warm-started Newton steps after every pair
    grad = z.T @ (sigmoid(z @ mle.theta) - y) + 2.0 * mle.theta
    assert np.linalg.norm(grad) < 1e-6  # a sum of 400 O(1) terms: converged to ~1e-9 relative


def test_active_selection_picks_the_least_explored_direction():
    head = OnePassRewardHead(dim=3, lam=1.0)
    for _ in range(20):
        head.update(np.array([1.0, 0.0, 0.0]), 1.0)  # many labels along e1
    candidates = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.5], [0.0, 0.3, 0.0]])
    # ||z||^2 in H^-1: e1 has been seen 20 times (small), e3 never: 1.5^2 = 2.25 > 0.3^2
    assert head.select(candidates) == 1
    u = head.uncertainty(candidates)
    np.testing.assert_allclose(u[1:], [1.5, 0.3])
    np.testing.assert_allclose(u, np.sqrt(np.einsum("nd,de,ne->n", candidates, head.h_inv, candidates)))


def test_scores_are_linear_in_features_and_give_the_preference_probability():
    head = OnePassRewardHead(dim=2)
    head.theta = np.array([1.0, -2.0])
    phi_a, phi_b = np.array([0.5, 0.25]), np.array([-1.0, 0.0])
    assert head.score(np.stack([phi_a, phi_b])).tolist() == [0.0, -1.0]
    assert head.preference_probability(phi_a - phi_b) == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_state_round_trip_and_spec():
    from asyncrlhf.api import OnePassHead

    head = OnePassRewardHead.from_spec(OnePassHead(**{"lambda": 2.0, "bound": 3.0, "eta": 0.5}), dim=4)
    assert (head.lam, head.bound, head.eta) == (2.0, 3.0, 0.5)
    head.update(np.ones(4), 1.0)
    restored = OnePassRewardHead(dim=4, lam=2.0, bound=3.0, eta=0.5)
    restored.load_state_dict(head.state_dict())
    np.testing.assert_array_equal(restored.theta, head.theta)
    np.testing.assert_array_equal(restored.h_inv, head.h_inv)
    assert restored.updates == 1
    with pytest.raises(ValueError, match="shape"):
        head.update(np.ones(3), 1.0)


# --- deployment-time adaptation: the paper's optimistic second answer -------------------------
# φ rows: a0 = (1, 0), a1 = (0, 0), a2 = (0, 3), a3 = (0.5, 0.5); a fresh head with λ = 1 has H⁻¹ = I,
# so the bonus of a′ is ‖φ(a′) − φ(a0)‖: a1 1, a2 √10 = 3.162, a3 √0.5 = 0.707.
PHI = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.5, 0.5]])


@pytest.mark.parametrize("bonus,second", [
    (0.0, 3),  # greedy runner-up: rewards θ·φ = 1, 0, 0, 0.5
    (0.2, 3),  # a1 0.2, a2 0.632, a3 0.5 + 0.141 = 0.641
    (0.3, 2),  # a1 0.3, a2 0.949, a3 0.5 + 0.212 = 0.712
    (100.0, 2),  # large ν: the most uncertain comparison (= select on φ(a′) − φ(a))
])
def test_deployment_pair_first_greedy_second_optimistic(bonus, second):
    head = OnePassRewardHead(dim=2, lam=1.0)
    head.theta = np.array([1.0, 0.0])
    assert head.deployment_pair(PHI, bonus) == (0, second)


def test_deployment_pair_bonus_is_relative_to_the_first_answer_in_the_h_inverse_norm():
    # After one update along (0, 1) the H⁻¹ norm shrinks in that direction: H = I + w e2 e2ᵀ,
    # w = σ′(z·θ₁); with θ set back to (1, 0) and ν = 1: a2's bonus is 3/√(1 + w) and a1's is 1.
    head = OnePassRewardHead(dim=2, lam=1.0)
    head.update(np.array([0.0, 1.0]), 1.0)
    w = sigmoid_prime(float(head.theta[1]))
    assert head.h_inv[1, 1] == pytest.approx(1.0 / (1.0 + w))
    head.theta = np.array([1.0, 0.0])
    a2 = 0.0 + np.sqrt(1.0 + 9.0 / (1.0 + w))  # ‖(−1, 3)‖ in H⁻¹ = diag(1, 1/(1+w))
    a3 = 0.5 + np.sqrt(0.25 + 0.25 / (1.0 + w))
    assert a2 > a3 and head.deployment_pair(PHI, 1.0) == (0, 2)
    with pytest.raises(ValueError, match="two candidate"):
        head.deployment_pair(PHI[:1])
    with pytest.raises(ValueError, match="bonus"):
        head.deployment_pair(PHI, -1.0)


@pytest.mark.slow
def test_quick_active_and_deployment_bench(tmp_path):
    """bench/onepass_active.py --quick: every learner and strategy on both feature kinds, and the
    deployment rules; the head learns (its served answers beat a random pick by the last quarter)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(repo / "bench" / "onepass_active.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "onepass_active.json").read_text())
    combos = {(r["features"], r["learner"], r["strategy"]) for r in result["active"]}
    assert len(combos) == 10  # 2 feature kinds x 5 learner/strategy pairs
    for r in result["active"]:
        labels = [n for n, _, _ in r["curve"]]
        assert labels == sorted(labels) and labels[-1] == result["settings"]["labels"]
        assert 0.5 <= r["final_accuracy"] <= 1.0
    for r in result["deployment"]:
        if r["rule"] == "optimistic ν=1":
            assert r["regret_last_quarter"] < r["random_pick_regret"]
    assert "## Deployment-time adaptation" in (tmp_path / "onepass_active.md").read_text()


@pytest.mark.slow
def test_quick_proxy_in_the_rl_loop_bench(tmp_path):
    """bench/onepass_rl.py --quick: the three proxies run; label counts and curves as configured."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(repo / "bench" / "onepass_rl.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "onepass_rl.json").read_text())
    st = result["settings"]
    budget = st["n0"] + st["steps"] * st["labels_per_step"]
    runs = result["runs"]
    assert [r["labels"] for r in runs["fixed proxy"]] == [st["n0"]] * st["seeds"]
    assert [r["labels"] for r in runs["adaptive proxy"]] == [budget] * st["seeds"]
    for arm in runs.values():
        for r in arm:
            assert len(r["curve"]) == st["steps"] + 1 and all(0.0 <= g <= 1.0 for g in r["curve"])
    # every arm starts from the same uniform policy: expected gold 1/V
    assert {r["curve"][0] for arm in runs.values() for r in arm} == {0.125}
