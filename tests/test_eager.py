"""Eager use (no `jax.jit` around the loop) reuses one compiled function.

The loops are psgd_jax's README examples as written (an eager `while` loop calling
`update` and `hessian_helper`), with our import. After the first steps no call may trace or
compile anything again, and memory must not grow with the number of steps.
"""

import contextlib
import resource

import jax
import jax.numpy as jnp
import optax
import pytest

import psgd_eqx
from psgd_eqx import hessian_helper, xmat


_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def count_compiles():
    """Counts JAX trace-to-jaxpr and backend-compile events inside the block."""
    counter = {"n": 0}

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event in _EVENTS:
            counter["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def loss_fn(params, x):
    return jnp.sum((params - x) ** 2)


def whitening_step(opt, params, x, opt_state):
    loss_val, grad = jax.value_and_grad(loss_fn)(params, x)
    updates, opt_state = opt.update(grad, opt_state)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss_val


def hessian_step(opt, key, params, x, opt_state):
    key, subkey = jax.random.split(key)
    loss_val, grad, hvp, vector, update_precond = hessian_helper(
        subkey, loss_fn, params, loss_fn_extra_args=(x,), has_aux=False,
        preconditioner_update_probability=1.0,
    )
    updates, opt_state = opt.update(
        grad, opt_state, Hvp=hvp, vector=vector, update_preconditioner=update_precond
    )
    params = optax.apply_updates(params, updates)
    return key, params, opt_state, loss_val


def _readme_problem():
    return jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 0.0, 0.0])


def test_readme_whitening_example_compiles_once():
    params, x = _readme_problem()
    opt = xmat(learning_rate=1.0, b1=0.0, preconditioner_update_probability=1.0)
    opt_state = opt.init(params)
    for _ in range(2):
        params, opt_state, loss_val = whitening_step(opt, params, x, opt_state)
    with count_compiles() as compiles:
        for _ in range(14):
            params, opt_state, loss_val = whitening_step(opt, params, x, opt_state)
    # `jax.value_and_grad` outside jit traces the loss each call (the same for Adam); the
    # optimizer itself must add nothing.
    with count_compiles() as grad_only:
        jax.value_and_grad(loss_fn)(params, x)
    assert compiles["n"] <= 14 * grad_only["n"]
    assert float(loss_val) < 1e-4  # the README's "yay"


def test_readme_hessian_helper_example_compiles_once():
    params, x = _readme_problem()
    opt = xmat(learning_rate=1.0, b1=0.0)
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(0)
    for _ in range(2):
        key, params, opt_state, loss_val = hessian_step(opt, key, params, x, opt_state)
    with count_compiles() as compiles:
        for _ in range(10):
            key, params, opt_state, loss_val = hessian_step(opt, key, params, x, opt_state)
    assert compiles["n"] == 0
    assert float(loss_val) < 1e-4


@pytest.mark.parametrize("name", ["kron", *(
    pytest.param(n, marks=pytest.mark.slow)
    for n in ("xmat", "psgd", "lra", "dense", "affine", "diag"))])
def test_every_alias_eager_update_is_cached(name):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
    make = getattr(psgd_eqx, name)
    opt = make(1e-2, lambda path, leaf: psgd_eqx.DiagQ.init(leaf.shape)) if name == "psgd" \
        else make(1e-2)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    with count_compiles() as compiles:
        for _ in range(3):
            updates, state = opt.update(grads, state, params)
        # A second optimizer with the same options shares the compiled function.
        again = make(1e-2, lambda path, leaf: psgd_eqx.DiagQ.init(leaf.shape)) \
            if name == "psgd" else make(1e-2)
        if name != "psgd":  # psgd's structure is a new callable: a new configuration
            again.update(grads, state, params)
    assert compiles["n"] == 0
    # Same numbers as the traced path.
    jitted, _ = jax.jit(opt.update)(grads, state, params)
    eager, _ = opt.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_injected_hyperparameters_eager_share_one_compile():
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.1)}
    opt = optax.inject_hyperparams(psgd_eqx.kron)(learning_rate=optax.linear_schedule(
        1e-2, 1e-3, 10))
    state = opt.init(params)
    _, state = opt.update(grads, state, params)
    with count_compiles() as compiles:
        _, state = opt.update(grads, state, params)
        _, state = opt.update(grads, state, params)
    # The injected learning rate changes every step; it is an argument of the compiled
    # function, not part of its cache key.
    assert compiles["n"] == 0


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_inside_jit_nothing_changes():
    params = {"w": jnp.ones((4, 3))}
    grads = {"w": jnp.full((4, 3), 0.1)}
    opt = psgd_eqx.kron(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(g, s):
        return opt.update(g, s, params)

    u_jit, _ = step(grads, state)
    u_vmap, _ = jax.vmap(lambda g: opt.update(g, state, params))(
        jax.tree.map(lambda g: g[None], grads))
    assert jnp.allclose(u_jit["w"], u_vmap["w"][0], rtol=1e-6, atol=1e-7)


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def test_memory_does_not_grow_over_eager_steps():
    params, x = _readme_problem()
    opt = xmat(learning_rate=0.1, b1=0.0)
    opt_state = opt.init(params)
    key = jax.random.PRNGKey(0)
    for _ in range(10):
        key, params, opt_state, _ = hessian_step(opt, key, params, x, opt_state)
    after_10 = _max_rss_mb()
    for _ in range(990):
        key, params, opt_state, _ = hessian_step(opt, key, params, x, opt_state)
    # Retracing every call grew memory by GBs over a few hundred calls; allow allocator
    # noise only.
    assert _max_rss_mb() - after_10 < 40.0
