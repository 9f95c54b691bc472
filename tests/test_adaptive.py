"""The adaptive refit schedule: refits follow the fit residual, within floor and ceiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx
from psgd_eqx._adaptive import AdaptiveRefits


def _run(opt, params, grads_fn, steps):
    state = opt.init(params)
    step = jax.jit(opt.update)
    refits = []
    for i in range(steps):
        _, state = step(grads_fn(i), state, params)
        refits.append(int(state[0].refits) if isinstance(state, tuple) else int(state.refits))
    return state, np.asarray(refits)


def _noise(params, scale_at):
    """Gradients with fixed per-row/column scales (P must learn them), times `scale_at(i)`."""
    shape_scale = {"w": jnp.logspace(-1.5, 1.5, 16)[None, :],
                   "v": jnp.logspace(-1.0, 1.0, 16)[:, None]}

    def grads(i):
        keys = jax.random.split(jax.random.PRNGKey(i), len(params))
        return {k: scale_at(i) * shape_scale[k] * jax.random.normal(kk, p.shape)
                for (k, p), kk in zip(sorted(params.items()), keys)}
    return grads


def test_rate_follows_staleness_between_floor_and_ceiling():
    sched = psgd_eqx.adaptive_refit_schedule(floor=0.05, ceiling=0.8, tolerance=0.5)
    s = jnp.asarray([0.0, 0.25, 0.5, 5.0], jnp.float32)
    np.testing.assert_allclose(jax.vmap(sched.rate)(s), [0.05, 0.05 + 0.75 * 0.25, 0.8, 0.8],
                               rtol=1e-6)


def test_fitted_refits_rarely_and_stale_refits_every_step():
    params = {"w": jnp.zeros((32, 16)), "v": jnp.zeros((16, 16))}
    # stationary noise, then at step 150 gradients 30× larger: P is suddenly far too large.
    # Measured (seed-fixed): 17 refits in the first 20 steps, 7 in steps 100–150, then all.
    grads = _noise(params, lambda i: 1.0 if i < 150 else 30.0)
    opt = psgd_eqx.scale_by_kron(
        preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule(floor=0.05),
        max_skew_triangular=float("inf"))
    _, refits = _run(opt, params, grads, 180)
    per_step = np.diff(refits, prepend=0)
    early, settled, after = per_step[:20], per_step[100:150], per_step[150:165]
    # at first the fit is far from done (the scales are not learned): refits on most steps
    assert early.sum() >= 12, early
    # fitted: close to the floor (0.05 → 2.5 of 50), well below the ceiling
    assert settled.sum() <= 15, settled
    # stale: a refit on every step after the jump (beyond the first, which still has the
    # old EMA: it needs one measurement to see the jump)
    assert after[1:].all(), after


@pytest.mark.slow  # default-suite time budget
def test_fitted_rate_is_below_a_fixed_probability_for_the_same_loss():
    """On a fixed quadratic, adaptive refits stop early while the loss matches p = 1."""
    n = 24
    h = jnp.diag(jnp.logspace(-2, 2, n))
    params = {"x": jnp.ones((n, 4))}
    key = jax.random.PRNGKey(0)

    def grads(i):
        noise = 0.01 * jax.random.normal(jax.random.fold_in(key, i), (n, 4))
        return None, noise

    def run(prob):
        opt = psgd_eqx.kron(0.05, preconditioner_update_probability=prob,
                            max_skew_triangular=float("inf"))
        x, state = params, opt.init(params)

        @jax.jit
        def step(x, state, noise):
            g = {"x": h @ x["x"] + noise}
            u, state = opt.update(g, state, x)
            return jax.tree.map(lambda a, b: a + b, x, u), state

        for i in range(300):
            x, state = step(x, state, grads(i)[1])
        loss = 0.5 * float(jnp.sum(x["x"] * (h @ x["x"])))
        return loss, int(state[0].refits)

    loss_fixed, refits_fixed = run(1.0)
    loss_adapt, refits_adapt = run(psgd_eqx.adaptive_refit_schedule())
    assert refits_fixed == 300
    assert refits_adapt < 0.5 * refits_fixed, refits_adapt
    assert loss_adapt < 2.0 * loss_fixed + 1e-3, (loss_adapt, loss_fixed)


def test_newton_fit_sees_the_shape_and_saves_refits():
    params = {"x": jnp.ones((12,))}
    h = jnp.linspace(0.5, 4.0, 12)

    def run(prob):
        opt = psgd_eqx.dense(0.5, per_leaf=True, preconditioner_update_probability=prob)
        state = opt.init(params)

        @jax.jit
        def step(x, state, key):
            v = {"x": jax.random.normal(key, (12,))}
            u, state = opt.update({"x": h * x["x"]}, state, x, Hvp={"x": h * v["x"]},
                                  vector=v)
            return jax.tree.map(lambda a, b: a + b, x, u), state

        x, stale = params, []
        for i in range(300):
            x, state = step(x, state, jax.random.PRNGKey(i))
            if state[0].staleness is not None:
                stale.append(float(psgd_eqx.diagnostics(state)["['x']"].staleness))
        return float(0.5 * jnp.sum(h * x["x"] ** 2)), int(state[0].refits), stale

    loss_fixed, refits_fixed, _ = run(1.0)
    loss_adapt, refits_adapt, stale = run(psgd_eqx.adaptive_refit_schedule())
    # The first step's scale is exact for H = c·I, so the scalar ratio ‖P·h‖²/‖v‖² starts
    # at 1; the per-index energies see that P = s·I has the wrong shape for this H.
    # Measured: staleness 0.06 after step 1, ~0.45 at its peak; 186 refits of 300 for a
    # final loss 3e-14 (p = 1: 4.5e-14).
    assert stale[0] > 0.01, stale[0]
    assert stale[-1] < max(stale), stale[-1]
    assert refits_adapt < 0.75 * refits_fixed, (refits_adapt, refits_fixed)
    assert loss_adapt < 10 * loss_fixed + 1e-12, (loss_adapt, loss_fixed)


def test_state_stays_finite_and_fixed_on_bad_gradients():
    params = {"w": jnp.zeros((8, 4))}
    opt = psgd_eqx.kron(1e-2, preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule())
    state = opt.init(params)
    _, state = opt.update({"w": jnp.ones((8, 4))}, state, params)
    before = state[0].staleness
    _, state = opt.update({"w": jnp.full((8, 4), jnp.nan)}, state, params)
    assert jax.tree.structure(before) == jax.tree.structure(state[0].staleness)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state[0].staleness)):
        np.testing.assert_array_equal(a, b)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


def test_owner_padding_and_buckets_do_not_count():
    # three same-shape leaves share a bucket; its staleness array has one row per member
    params = {f"w{i}": jnp.zeros((6, 4)) for i in range(3)}
    opt = psgd_eqx.kron(1e-2, preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule())
    state = opt.init(params)
    # per bucket, per axis: (members, axis length)
    assert [[e.shape for e in es] for es in state[0].staleness[1]] == [[(3, 6), (3, 4)]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(floor=0.0), "`floor` must be in"),
    (dict(floor=0.5, ceiling=0.4), "`floor` must be in"),
    (dict(ceiling=1.5), "`ceiling` must be in"),
    (dict(tolerance=0.0), "`tolerance` must be > 0"),
    (dict(beta=1.0), "`beta` must be in"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        psgd_eqx.adaptive_refit_schedule(**kwargs)
    with pytest.raises(TypeError, match="floor"):  # (beartype names it first in tests)
        psgd_eqx.adaptive_refit_schedule(floor="0.1")


def test_value_semantics_and_bernoulli_is_refused():
    a, b = psgd_eqx.adaptive_refit_schedule(), psgd_eqx.adaptive_refit_schedule()
    assert a == b and hash(a) == hash(b) and isinstance(a, AdaptiveRefits)
    assert repr(a).startswith("adaptive_refit_schedule(floor=0.03")
    with pytest.raises(ValueError, match="bernoulli_refit=False"):
        psgd_eqx.kron(1e-3, preconditioner_update_probability=a, bernoulli_refit=True)
