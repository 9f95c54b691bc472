"""Shared test utilities: SPD factories, matrix powers, tree comparison, loading the
examples."""

import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


def spd(key, n: int, cond: float, dtype=jnp.float32):
    """A random SPD matrix with condition number `cond` (eigenvalues log-spaced in [1, cond])."""
    u, _ = jnp.linalg.qr(jax.random.normal(key, (n, n), jnp.float32))
    s = jnp.logspace(0.0, jnp.log10(cond), n, dtype=jnp.float32)
    return ((u * s[None, :]) @ u.T).astype(dtype)


def mpow(a, p: float):
    """Power of a Hermitian positive-definite matrix."""
    w, u = jnp.linalg.eigh(a)
    return (u * (w**p)[None, :]) @ jnp.conj(u).T


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol)


def tree_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """The module `examples/<name>.py`, loaded from its file (a fresh module per call)."""
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def standard_promotion(factory):
    """`factory` (e.g. `optax.adam`) whose `update` runs under standard dtype promotion.

    optax.adam is not clean under jax_numpy_dtype_promotion="strict" (optax 0.2.8: its bias
    correction computes `b1 ** count` with a Python float and an int32 count). Only that
    update is relaxed; the examples' own code and psgd_eqx stay under the suite's strict
    mode.
    """
    def wrapped(*args, **kwargs):
        opt = factory(*args, **kwargs)

        def update(updates, state, params=None, **extra):
            with jax.numpy_dtype_promotion("standard"):
                return opt.update(updates, state, params, **extra)

        return optax.GradientTransformationExtraArgs(opt.init, update)

    return wrapped


def noisy_sin_steps(opt, params, steps: int):
    """`steps` jitted training steps of `opt` on the gradient sin(3x) + 0.1·noise (fixed
    keys): `(params, state)` after them."""
    state = opt.init(params)

    @jax.jit
    def step(p, s, k):
        g = jax.tree.map(lambda x: jnp.sin(3.0 * x) + 0.1 * jax.random.normal(k, x.shape), p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for k in jax.random.split(jax.random.PRNGKey(1), steps):
        params, state = step(params, state, k)
    return params, state
