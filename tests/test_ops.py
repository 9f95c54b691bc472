"""Kernel dispatch (`use_kernels`): kernel and reference paths agree end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx


def _run(use_kernels, steps=3, geometry="EQ"):
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 24)), "b": jnp.zeros(24)}
    opt = psgd_eqx.kron(1e-2, geometry=geometry, use_kernels=use_kernels)
    state = opt.init(params)

    @jax.jit
    def step(p, s, k):
        g = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1 * jax.random.normal(k, x.shape), p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for k in jax.random.split(jax.random.PRNGKey(1), steps):
        params, state = step(params, state, k)
    return params, state


def _assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            scale = float(jnp.max(jnp.abs(y))) + 1e-12
            np.testing.assert_allclose(x, y, atol=rtol * scale, rtol=0)


def test_interpreted_kernels_match_reference_end_to_end():
    _assert_close(_run("interpret"), _run(False), 1e-5)


def test_platform_dispatch_lowers_on_cpu():
    # True dispatches through lax.platform_dependent: on CPU the reference branch runs
    _assert_close(_run(True), _run(False), 1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_kernels_match_reference_on_gpu():
    # TF32 products in the kernel: looser tolerance
    _assert_close(_run(True), _run(False), 2e-3)


def test_bad_use_kernels():
    with pytest.raises(ValueError, match="use_kernels"):
        psgd_eqx.kron(use_kernels="yes")
    with pytest.raises(ValueError, match="use_kernels"):
        psgd_eqx.KronQ.init((3, 3), use_kernels="always")
