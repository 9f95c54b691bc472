"""Momentum: the EMA of the gradients that PSGD preconditions.

Two conventions: optax's bias-corrected EMA m/(1 − b1ᵗ) (default), or the reference's
warm-up βₜ = min(t/(t+1), b1) without correction. A non-finite gradient leaves the buffer
untouched; a bf16 buffer is written with stochastic rounding (unbiased for tiny steps).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from . import _rng
from ._misc import concrete
from ._numerics import compute_dtype, promote, stochastic_round


def init_momentum(params: PyTree, b1, mu_dtype) -> PyTree | None:
    """Zeros like `params` (in `mu_dtype` if given), or `None` when `b1 = 0`.

    A traced `b1` (injected hyperparameter) keeps the buffer: with b1 = 0 it then just
    holds the last gradient, which gives the same updates.
    """
    if concrete(b1) == 0:
        return None
    return jax.tree.map(lambda p: jnp.zeros(p.shape, _buffer_dtype(p.dtype, mu_dtype)), params)


def _buffer_dtype(param_dtype, mu_dtype):
    # A real `mu_dtype` on complex params would silently drop the imaginary part: the
    # buffer keeps the requested precision but stays complex (as `precond_dtype` does).
    if mu_dtype is None:
        return param_dtype
    if jnp.issubdtype(param_dtype, jnp.complexfloating) and not jnp.issubdtype(
            mu_dtype, jnp.complexfloating):
        return jnp.complex128 if jnp.dtype(mu_dtype).itemsize > 4 else jnp.complex64
    return mu_dtype


def coefficients(count: Int[Array, ""], b1: ArrayLike, warmup: bool
                 ) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """`(β, debias, debias_next)` of this step (f32): the EMA factor, the bias correction
    1 − βᵗ⁺¹ and the next step's 1 − βᵗ⁺² (Nesterov's look-ahead uses it).

    **Arguments:**

    - `count`: the step count before this step.
    - `b1`, `warmup`: see [`psgd_eqx.scale_by_psgd`][].

    **Returns:** three f32 scalars (both corrections are 1 with the reference's warm-up).
    """
    t = count.astype(jnp.float32)
    if warmup:
        beta = jnp.minimum(t / (t + 1.0), jnp.asarray(b1).astype(jnp.float32))
        one = jnp.ones([], jnp.float32)
        return beta, one, one
    beta = jnp.asarray(b1).astype(jnp.float32)
    return beta, 1.0 - beta ** (t + 1.0), 1.0 - beta ** (t + 2.0)


def step(
    m: Array,
    g: Array,
    index: Int[ArrayLike, ""],
    *,
    beta: Float[Array, ""],
    debias: Float[Array, ""],
    finite: Bool[Array, ""],
    key: PRNGKeyArray,
    stochastic_rounding: bool,
    debias_next: Float[Array, ""] | None = None,
) -> tuple[Array, Array]:
    """One EMA step of one leaf.

    **Arguments:**

    - `m`, `g`: the leaf's buffer and gradient.
    - `index`: the leaf's position in flattening order (folded into `key`, so every leaf
        rounds with its own bits, bucketed or not).
    - `beta`, `debias`, `debias_next`: from [`coefficients`][]; with `debias_next`
        the momentum returned is Nesterov's β·mₜ/(1 − βᵗ⁺²) + (1 − β)·g/(1 − βᵗ⁺¹).
    - `finite`: whether every gradient is finite (else the buffer is kept).
    - `key`: randomness for stochastic rounding of a bf16 buffer.
    - `stochastic_rounding`: see [`psgd_eqx.scale_by_psgd`][].

    **Returns:** `(new_m, m_hat)`: the stored buffer and the (debiased) momentum in the
    gradient's dtype.
    """
    cd = compute_dtype(promote(m.dtype, g.dtype))
    nm = beta.astype(cd) * m.astype(cd) + (1.0 - beta).astype(cd) * g.astype(cd)
    written = nm.astype(m.dtype)
    if stochastic_rounding and jnp.dtype(m.dtype) == jnp.dtype(jnp.bfloat16):
        written = stochastic_round(nm, m.dtype, _rng.fold_in(key, index))
    if debias_next is None:
        m_hat = nm / debias.astype(cd)
    else:
        b = beta.astype(cd)
        m_hat = b * nm / debias_next.astype(cd) + (1.0 - b) * g.astype(cd) / debias.astype(cd)
    return jnp.where(finite, written, m), m_hat.astype(g.dtype)
