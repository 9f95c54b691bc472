"""Nesterov momentum (`nesterov=True`) in every alias: the formula, against a hand-written
reference with P = I, and the psgd_jax spelling (`nesterov=None` = off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx


def _grads(i):
    k = jax.random.fold_in(jax.random.PRNGKey(3), i)
    return {"w": jax.random.normal(k, (5, 3)), "b": jnp.full((3,), 0.1 * (i + 1))}


@pytest.mark.parametrize("warmup", [False, True])
def test_nesterov_momentum_formula_with_identity_preconditioner(warmup):
    b1 = 0.8
    params = _grads(99)
    opt = psgd_eqx.scale_by_psgd(lambda path, leaf: None, b1=b1, nesterov=True,
                                 momentum_warmup=warmup, grad_clip_max_amp=None,
                                 grad_clip_max_element=None)
    state = opt.init(params)
    m = jax.tree.map(jnp.zeros_like, params)
    for t in range(4):  # t = steps before this one
        g = _grads(t)
        u, state = opt.update(g, state, params)
        if warmup:  # the reference's βₜ = min(t/(t+1), b1), no bias correction
            beta = min(t / (t + 1), b1)
            m = jax.tree.map(lambda m_, g_, beta=beta: beta * m_ + (1 - beta) * g_, m, g)
            want = jax.tree.map(lambda m_, g_, beta=beta: beta * m_ + (1 - beta) * g_, m, g)
        else:
            m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
            want = jax.tree.map(
                lambda m_, g_, t=t: b1 * m_ / (1 - b1 ** (t + 2)) + (1 - b1) * g_ / (
                    1 - b1 ** (t + 1)), m, g)
        for k in params:
            np.testing.assert_allclose(u[k], want[k], rtol=2e-6, atol=1e-7, err_msg=(t, k))


@pytest.mark.parametrize("name", [
    "kron", *(pytest.param(n, marks=pytest.mark.slow) for n in ("xmat", "diag"))])
def test_nesterov_changes_the_update_and_psgd_jax_none_means_off(name):
    fn = getattr(psgd_eqx, name)
    params = _grads(99)

    def run(**kw):
        opt = fn(1e-2, **kw)
        state = opt.init(params)
        for t in range(3):
            u, state = opt.update(_grads(t), state, params)
        return u

    off, on = run(), run(nesterov=True)
    assert not np.allclose(off["w"], on["w"], rtol=1e-3)
    # off by default (psgd_jax's aliases keep its `nesterov=None` default, = off)
    np.testing.assert_array_equal(run(nesterov=False)["w"], off["w"])
    with pytest.raises(ValueError, match="nesterov"):
        fn(1e-2, nesterov="yes")
