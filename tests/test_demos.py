"""Short versions of the reference's demos (examples/rosenbrock.py and
examples/tensor_decomposition.py): Newton-type PSGD on small Rosenbrock and CP problems.

The thresholds come from measurements with margin: over seeds 0–19,
- 10-D Rosenbrock, `dense`: f < 1e-6 first at steps 398–516 (f(800) ≈ 1e-10);
- 8×10×12 rank-3 CP, `lra`: loss < 1e-6 first at steps 58–308 (loss(1000) ≈ 1e-11);
- same problem, `kron`: loss < 1e-6 first at steps 131–470 (loss(1000) ≈ 5e-10).
Each run is one compiled `lax.scan` shared by its seeds; compilation dominates the time.
"""

import math

import jax
import numpy as np
import pytest

from .helpers import load_example


SEEDS = (0, 1, 2)
CP_RANK, CP_SHAPE, CP_STEPS = 3, (8, 10, 12), 700


# Loaded once per test module, so tests share the examples' compiled runs.
@pytest.fixture(scope="module")
def rosenbrock():
    return load_example("rosenbrock")


@pytest.fixture(scope="module")
def tensor_decomposition():
    return load_example("tensor_decomposition")


def _first_below(losses: np.ndarray, target: float) -> int | None:
    hits = np.flatnonzero(losses < target)
    return int(hits[0]) if hits.size else None


def test_rosenbrock_10d_dense_newton(rosenbrock):
    for seed in SEEDS:
        losses = rosenbrock.run(seed, 800, dim=10)
        assert losses.shape == (800,)
        assert np.all(np.isfinite(losses))
        assert losses[0] == pytest.approx(5.0)  # f(0) = 5 for 5 pairs
        hit = rosenbrock.first_below(losses, 1e-6)
        assert hit is not None and hit <= 700, (seed, hit)
        assert losses[-1] < 1e-8, (seed, losses[-1])


@pytest.mark.parametrize(
    "method, steps, within, final",
    [pytest.param("lra", CP_STEPS, 450, 1e-9, marks=pytest.mark.slow),
     ("kron", CP_STEPS, 650, 1e-8)],
)
def test_cp_decomposition_newton(tensor_decomposition, method, steps, within, final):
    for seed in SEEDS:
        losses = tensor_decomposition.run(method, seed, steps, CP_RANK, CP_SHAPE)
        assert losses.shape == (steps,)
        assert np.all(np.isfinite(losses))
        hit = _first_below(losses, 1e-6)
        assert hit is not None and hit <= within, (method, seed, hit)
        assert losses[-1] < final, (method, seed, losses[-1])


def test_cp_gradient_descent_baseline_is_slower(tensor_decomposition):
    # The baseline runs (same problems, lr 1e-4) and makes progress, far slower than PSGD.
    for seed in SEEDS:
        losses = tensor_decomposition.run("gd", seed, CP_STEPS, CP_RANK, CP_SHAPE)
        assert np.all(np.isfinite(losses))
        assert losses[-1] < losses[0]
        assert losses[-1] > 1e-6


def test_rosenbrock_main(rosenbrock, tmp_path):
    # The full demo (100-D, 2,000 steps, 3 seeds) is cheap enough to run as is; the issue's
    # goal is f < 1e-6 within 2,000 steps on every seed (the reference: steps 1,428–1,589;
    # measured here: 1,328–1,363).
    out = tmp_path / "rosenbrock.png"
    results = rosenbrock.main(out=str(out), progress=False)
    assert out.exists() and out.stat().st_size > 0
    assert set(results) == set(SEEDS)
    for seed, r in results.items():
        assert len(r["losses"]) == 2000
        assert np.all(np.isfinite(r["losses"]))
        assert r["losses"][0] == pytest.approx(50.0)  # f(0) = 50 for 50 pairs
        hit = r["first_below_1e-6"]
        assert hit is not None and hit <= 1800, (seed, hit)
        assert r["final_loss"] < 1e-8, (seed, r["final_loss"])
        assert math.isfinite(r["seconds"])


@pytest.mark.slow  # default-suite time budget
def test_tensor_decomposition_main(tensor_decomposition, tmp_path):
    # The small problem and step count of the tests above (their compiled runs are reused
    # when the tests run together); two methods keep it short when it runs alone.
    out = tmp_path / "tensor_decomposition.png"
    results = tensor_decomposition.main(
        steps=CP_STEPS,
        seeds=(0,),
        out=str(out),
        progress=False,
        methods=("lra", "gd"),
        rank=CP_RANK,
        shape=CP_SHAPE,
    )
    assert out.exists() and out.stat().st_size > 0
    assert set(results) == {"lra", "gd"}
    for per_seed in results.values():
        assert set(per_seed) == {0}
        r = per_seed[0]
        assert len(r["losses"]) == CP_STEPS
        assert np.all(np.isfinite(r["losses"]))
        assert r["final_loss"] < r["losses"][0]
    assert results["lra"][0]["first_below_1e-6"] is not None
    assert results["gd"][0]["first_below_1e-6"] is None


def test_tensor_decomposition_problem_is_exact_rank(tensor_decomposition):
    # The target has an exact decomposition of the fitted rank, at the demo's full size.
    key = jax.random.PRNGKey(0)
    target, init = tensor_decomposition.make_problem(key)
    assert target.shape == (20, 50, 100)
    assert [f.shape for f in init] == [(10, 20), (10, 50), (10, 100)]
    assert sum(f.size for f in init) == 1700
    assert float(tensor_decomposition.loss_fn(init, target)) > 1e5
    k_true, _ = jax.random.split(key)
    truth = [
        jax.random.normal(k, (10, n)) for k, n in zip(jax.random.split(k_true, 3), (20, 50, 100))
    ]
    assert float(tensor_decomposition.loss_fn(tuple(truth), target)) == 0.0


@pytest.mark.slow
def test_tensor_decomposition_full_demo(tensor_decomposition):
    # The full demo (20×50×100, rank 10, 2,000 steps, seeds 0–2; ~1.5 min on 2 CPU cores).
    # Kron Newton reaches < 1e-6 on every seed (reference: 2 of 3, one stuck at 7.4e4). LRA
    # Newton diverges on seed 0: it sits on a plateau (loss ≈ 7.8e4) for ~400 steps and the
    # unclipped step overshoots when it escapes; the reference's algorithm (no clipping)
    # does this on a similar share of problems (an independent port of its LRANewton:
    # 3 failures in seeds 0–49; psgd_eqx.lra: 5), so only 2 of 3 are required here.
    results = tensor_decomposition.main(
        steps=2000, out=None, progress=False, methods=("lra", "kron")
    )
    for method, need in (("lra", 2), ("kron", 3)):
        finals = [r["final_loss"] for r in results[method].values()]
        assert sum(f < 1e-6 for f in finals) >= need, (method, finals)
