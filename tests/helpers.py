"""Shared test utilities: SPD factories, matrix powers, tree comparison."""

import equinox as eqx
import jax
import jax.numpy as jnp


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
