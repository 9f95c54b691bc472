"""The fits' counter-based randomness (`psgd_eqx._rng`) and the state key's successor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx
from psgd_eqx import _rng


_KEYS = {
    "raw threefry": lambda: jax.random.PRNGKey(3),
    "typed threefry": lambda: jax.random.key(3),
    "typed rbg": lambda: jax.random.key(3, impl="rbg"),
    "raw 4 words": lambda: jnp.arange(4, dtype=jnp.uint32),
}


def _data(k):
    typed = jnp.issubdtype(k.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(k) if typed else k)


@pytest.mark.parametrize("kind", list(_KEYS))
def test_successor_keeps_the_kind_of_key(kind):
    key = _KEYS[kind]()
    nxt = _rng.successor(key)
    assert nxt.dtype == key.dtype and nxt.shape == key.shape
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        assert jax.random.key_impl(nxt) == jax.random.key_impl(key)
        jax.random.normal(nxt, (2,))  # still a usable JAX key
    seen, k = set(), key
    for _ in range(200):  # a chain of distinct keys, the same under jit
        seen.add(_data(k).tobytes())
        k = _rng.successor(k)
    assert len(seen) == 200
    np.testing.assert_array_equal(_data(jax.jit(_rng.successor)(key)), _data(nxt))


def test_draws_have_the_right_moments():
    z = np.asarray(_rng.normal(jnp.array([1, 2], jnp.uint32), (200_000,)))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert np.all(np.isfinite(z)) and 4.0 < np.abs(z).max() < 7.0
    u = np.asarray(_rng.uniform(jnp.array([5, 6], jnp.uint32), (100_000,)))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    a, b = _rng.split(jnp.array([1, 2], jnp.uint32))
    za, zb = (np.asarray(_rng.normal(k, (50_000,))) for k in (a, b))
    assert abs(np.corrcoef(za, zb)[0, 1]) < 0.02  # split streams are uncorrelated


@pytest.mark.parametrize("kind", ["typed rbg", "raw threefry"])
def test_optimizer_state_keeps_the_users_kind_of_key(kind):
    params = {"w": jnp.ones((4, 3))}
    opt = psgd_eqx.kron(1e-2, key=_KEYS[kind]())
    state = opt.init(params)
    (st,) = [s for s in state if isinstance(s, psgd_eqx.PSGDState)]
    _, state2 = jax.jit(opt.update)(params, state, params)
    (st2,) = [s for s in state2 if isinstance(s, psgd_eqx.PSGDState)]
    assert st2.key.dtype == st.key.dtype and st2.key.shape == st.key.shape
    assert not np.array_equal(_data(st2.key), _data(st.key))
