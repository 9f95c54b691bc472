"""bf16 storage with stochastic rounding on write (f32 compute)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx as pe
from psgd_eqx._numerics import stochastic_round


def test_stochastic_round_is_unbiased_and_keeps_specials():
    # 1 + 2⁻¹² is 1/32 of a bf16 ulp above 1: nearest rounding always gives 1.0
    x = jnp.full((100_000,), 1.0 + 2.0**-12, jnp.float32)
    r = stochastic_round(x, jnp.bfloat16, jax.random.PRNGKey(0))
    assert r.dtype == jnp.bfloat16
    mean = float(jnp.mean(r.astype(jnp.float32))) - 1.0
    assert abs(mean - 2.0**-12) < 0.1 * 2.0**-12
    assert float(x.astype(jnp.bfloat16)[0]) == 1.0
    # negative values round in magnitude the same way; exact values stay exact
    neg = stochastic_round(-x, jnp.bfloat16, jax.random.PRNGKey(1)).astype(jnp.float32)
    assert abs(float(jnp.mean(neg)) + 1.0 + 2.0**-12) < 0.1 * 2.0**-12
    special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, -2.5], jnp.float32)
    out = stochastic_round(special, jnp.bfloat16, jax.random.PRNGKey(2)).astype(jnp.float32)
    np.testing.assert_array_equal(np.isnan(out), [False, False, True, False, False])
    np.testing.assert_array_equal(np.asarray(out)[[0, 1, 3, 4]], [np.inf, -np.inf, 0.0, -2.5])
    # any other dtype: a plain cast
    assert stochastic_round(x, jnp.float16, jax.random.PRNGKey(3)).dtype == jnp.float16


@pytest.mark.parametrize("rounding", [True, False])
def test_bf16_momentum_keeps_small_increments(rounding):
    """An EMA with b1 = 0.999 of a constant gradient 1: past m ≈ 0.5 each increment is
    below half a bf16 ulp, so nearest rounding stalls; stochastic rounding tracks it."""
    params = {"w": jnp.zeros((512,), jnp.float32)}
    opt = pe.scale_by_psgd(
        lambda path, leaf: None, b1=0.999, mu_dtype=jnp.bfloat16,
        stochastic_rounding=rounding,
    )
    state = opt.init(params)
    grads = {"w": jnp.ones((512,), jnp.float32)}

    def body(state, _):
        return opt.update(grads, state, params)[1], None

    state, _ = jax.lax.scan(body, state, None, length=2000)
    mu = state.mu["w"]
    assert mu.dtype == jnp.bfloat16
    want = 1.0 - 0.999**2000  # 0.865
    got = float(jnp.mean(mu.astype(jnp.float32)))
    if rounding:
        assert abs(got - want) < 0.02, got
    else:
        assert got < want - 0.2, got  # stalled near 0.5


@pytest.mark.parametrize("name", [
    "kron", pytest.param("lra", marks=pytest.mark.slow), "xmat", "diag"])
def test_bf16_preconditioner_storage_trains(name):
    params = {"w": jnp.ones((16, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
    y = jax.random.normal(jax.random.PRNGKey(1), (64, 8))

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)

    opt = getattr(pe, name)(1e-2, precond_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16)
    state = opt.init(params)
    psgd_state = state[0]
    before = jax.tree.map(lambda a: a.dtype,
                          (psgd_state.preconditioners(), psgd_state.global_precond))

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        u, state = opt.update(g, state, p)
        return optax.apply_updates(p, u), state, value

    p, values = params, []
    for _ in range(100):
        p, state, value = step(p, state)
        values.append(float(value))
    after = jax.tree.map(lambda a: a.dtype, (state[0].preconditioners(), state[0].global_precond))
    assert after == before  # storage dtypes survive the f32 fit
    stored = [a for a in jax.tree.leaves((state[0].preconditioners(), state[0].global_precond))]
    assert any(a.dtype == jnp.bfloat16 for a in stored)
    assert state[0].mu["w"].dtype == jnp.bfloat16
    assert np.isfinite(values).all() and values[-1] < 0.7 * values[0]
