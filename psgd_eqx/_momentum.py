"""Momentum: the EMA of the gradients that PSGD preconditions.

Two conventions: optax's bias-corrected EMA m/(1 − b1ᵗ) (default), or the reference's
warm-up βₜ = min(t/(t+1), b1) without correction. A non-finite gradient leaves the buffer
untouched; a bf16 buffer is written with stochastic rounding (unbiased for tiny steps).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Int, PRNGKeyArray, PyTree

from ._misc import concrete
from ._numerics import compute_dtype, promote, stochastic_round


def init_momentum(params: PyTree, b1, mu_dtype) -> PyTree | None:
    """Zeros like `params` (in `mu_dtype` if given), or `None` when `b1 = 0`.

    A traced `b1` (injected hyperparameter) keeps the buffer: with b1 = 0 it then just
    holds the last gradient, which gives the same updates.
    """
    if concrete(b1) == 0:
        return None
    return jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params)


def update_momentum(
    mu: list[Array],
    grads: list[Array],
    count: Int[Array, ""],
    finite: Bool[Array, ""],
    key: PRNGKeyArray,
    *,
    b1: ArrayLike,
    warmup: bool,
    stochastic_rounding: bool,
) -> tuple[list[Array], list[Array]]:
    """One EMA step per leaf.

    **Arguments:**

    - `mu`, `grads`: the buffers and the gradients, leaf by leaf.
    - `count`: the step count before this step.
    - `finite`: whether every gradient is finite (else the buffers are kept).
    - `key`: randomness for stochastic rounding (folded with the leaf index).
    - `b1`, `warmup`, `stochastic_rounding`: see [`psgd_eqx.scale_by_psgd`][].

    **Returns:** `(new_mu, m_hat)`: the stored buffers and the (debiased) momenta in the
    gradients' dtypes.
    """
    t = count.astype(jnp.float32)
    if warmup:
        beta = jnp.minimum(t / (t + 1.0), jnp.asarray(b1).astype(jnp.float32))
        debias = jnp.ones([], jnp.float32)
    else:
        beta = jnp.asarray(b1).astype(jnp.float32)
        debias = 1.0 - beta ** (t + 1.0)
    new_mu, m_hat = [], []
    for i, (m, g) in enumerate(zip(mu, grads)):
        cd = compute_dtype(promote(m.dtype, g.dtype))
        nm = beta.astype(cd) * m.astype(cd) + (1.0 - beta).astype(cd) * g.astype(cd)
        written = nm.astype(m.dtype)
        if stochastic_rounding and jnp.dtype(m.dtype) == jnp.dtype(jnp.bfloat16):
            written = stochastic_round(nm, m.dtype, jax.random.fold_in(key, i))
        new_mu.append(jnp.where(finite, written, m))
        m_hat.append((nm / debias.astype(cd)).astype(g.dtype))
    return new_mu, m_hat
