"""Update clipping styles: the soft trust region (HeavyBall's) and the default RMS +
element bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx
from psgd_eqx._apply import clip, soft_clip


def test_soft_clip_shape_of_the_curve():
    x = jnp.array([-1e6, -30.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 3.0, 30.0, 1e6])
    y = soft_clip(x)
    np.testing.assert_array_equal(jnp.sign(y), jnp.sign(x))  # signs kept
    assert float(jnp.max(jnp.abs(y))) <= 2.0  # never past ±2
    np.testing.assert_allclose(y[jnp.array([4, 6])], x[jnp.array([4, 6])], rtol=1e-3)  # ≈ x near 0
    np.testing.assert_allclose(y, -y[::-1])  # odd
    assert bool(jnp.all(jnp.diff(y) >= 0))  # monotone
    # the formula at one point: 1.5·(0.1·log1p(1/1.5) + 0.9·tanh(1/1.5))
    want = 1.5 * (0.1 * np.log1p(1 / 1.5) + 0.9 * np.tanh(1 / 1.5))
    np.testing.assert_allclose(y[7], want, rtol=1e-6)
    # complex: the magnitude is clipped, the phase kept
    z = jnp.array([3.0 + 4.0j, 1e-3j], jnp.complex64)
    w = clip(z, None, None, "soft")
    np.testing.assert_allclose(jnp.abs(w), soft_clip(jnp.abs(z)), rtol=1e-6)
    np.testing.assert_allclose(jnp.angle(w), jnp.angle(z), rtol=1e-6)


def test_soft_style_bounds_every_element_and_ignores_the_rms_bound():
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
    grads = {"w": 1e3 * jax.random.normal(jax.random.PRNGKey(0), (6, 4)),
             "b": jnp.array([1e-4, -1e-4, 5.0, -5.0])}
    lr = 0.1
    soft = psgd_eqx.kron(lr, update_clip_style="soft", preconditioner_init_scale=1.0, b1=0.0)
    hard = psgd_eqx.kron(lr, preconditioner_init_scale=1.0, b1=0.0)
    u_soft, _ = soft.update(grads, soft.init(params), params)
    u_hard, _ = hard.update(grads, hard.init(params), params)
    free = psgd_eqx.kron(lr, preconditioner_init_scale=1.0, b1=0.0, grad_clip_max_amp=None,
                         grad_clip_max_element=None)
    u_free, _ = free.update(grads, free.init(params), params)  # -lr·P·g, unclipped
    assert float(jnp.max(jnp.abs(u_soft["w"]))) <= 2.0 * lr + 1e-6
    for k in params:  # the same P (same keys): soft = -lr·soft_clip(P·g)
        np.testing.assert_allclose(u_soft[k], -lr * soft_clip(u_free[k] / -lr), rtol=1e-5,
                                   atol=1e-9)
    assert not np.allclose(u_soft["w"], u_hard["w"])  # the styles differ
    with pytest.raises(ValueError, match="update_clip_style"):
        psgd_eqx.kron(lr, update_clip_style="hard")


def test_global_norm_style_bounds_the_whole_update():
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
    grads = {"w": 1e2 * jax.random.normal(jax.random.PRNGKey(0), (6, 4)),
             "b": jnp.array([1e-4, -1e-4, 5.0, -5.0])}
    common = dict(preconditioner_init_scale=1.0, b1=0.0)
    free = psgd_eqx.scale_by_kron(grad_clip_max_amp=None, grad_clip_max_element=None, **common)
    u_free, _ = free.update(grads, free.init(params), params)
    norm_free = float(optax.tree.norm(u_free))
    for bound in (0.5 * norm_free, 2.0 * norm_free):
        opt = psgd_eqx.scale_by_kron(update_clip_style="global_norm",
                                     update_global_norm_clip=bound, **common)
        u, _ = opt.update(grads, opt.init(params), params)
        if bound < norm_free:  # scaled as a whole: one factor for every leaf
            np.testing.assert_allclose(float(optax.tree.norm(u)), bound, rtol=1e-5)
            factor = bound / norm_free
            for k in params:
                np.testing.assert_allclose(u[k], factor * u_free[k], rtol=1e-5, atol=1e-7)
        else:  # under the bound: untouched, even where the RMS bound (2) would have cut
            for k in params:
                np.testing.assert_allclose(u[k], u_free[k], rtol=1e-6)
            assert float(jnp.sqrt(jnp.mean(u["w"] ** 2))) > 2.0


def test_global_norm_style_needs_its_bound_and_the_aliases_select_it():
    with pytest.raises(ValueError, match="update_global_norm_clip"):
        psgd_eqx.kron(1e-3, update_clip_style="global_norm")
    with pytest.raises(ValueError, match="cannot be combined"):
        psgd_eqx.xmat(1e-3, update_global_norm_clip=1.0, update_clip_style="soft")
    params = {"w": jnp.zeros((5, 3))}
    grads = {"w": 1e3 * jnp.ones((5, 3))}
    # psgd_jax's option: the update's global norm is lr · bound at most, and the per-tensor
    # RMS bound no longer applies (psgd_jax's xmat had none)
    opt = psgd_eqx.xmat(0.1, update_global_norm_clip=3.0, preconditioner_init_scale=1.0)
    u, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 0.1 * 3.0, rtol=1e-5)
