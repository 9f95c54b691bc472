"""Step-size normalisers: cheap spectral-norm lower bounds and the Lipschitz EMA.

Every geometry step is `Q ← Q − (μ/L)·(…)`, where L bounds the local Lipschitz constant of
the fitting criterion. `ℓ` is a cheap lower bound of ‖T₁ + T₂‖₂ and L is either ℓ itself
(instantaneous, psgd_jax) or the EMA-max `max(β L + (1 − β) ℓ, ℓ)` of the reference. L is
always kept in f32 (or f64 for f64 params), never in the (possibly bf16) storage dtype.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from . import _rng
from ._numerics import abs2, compute_dtype, real_dtype


def _row_norms(a: Array) -> Array:
    return jnp.sqrt(jnp.sum(abs2(a), axis=-1))


def _aligned_start(a: Array, key: PRNGKeyArray, k: int) -> Array:
    # k random rows rotated so their centroid points along the largest row of `a`: the
    # subspace then has a large component along the dominant direction even for matrices
    # of very low rank (the reference's branchless variant).
    j = jnp.argmax(_row_norms(a))
    aj = a[j]
    v = _rng.normal(key, (k, a.shape[1]), a.dtype)
    dots = jnp.sum(aj[None, :] * jnp.conj(v), axis=1, keepdims=True)
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        mag = jnp.abs(dots)
        sign = jnp.where(mag > 0, dots / jnp.where(mag > 0, mag, 1.0).astype(dots.dtype), 1.0)
    else:
        sign = jnp.sign(dots)
    return aj[None, :] + sign * v


def _subspace_bound(a: Array, key: PRNGKeyArray, k: int, half_iters: int) -> Array:
    tiny = jnp.finfo(real_dtype(a.dtype)).smallest_normal
    v = _aligned_start(a, key, k)
    for _ in range(half_iters):
        v = v @ a
        v = v / (_row_norms(v)[:, None] + tiny).astype(a.dtype)
        v = v @ a
    return jnp.max(_row_norms(v))


def _one_step_bound(a: Array) -> Array:
    # psgd_jax's bound: one power step started from the largest row. For a normal matrix
    # (Hermitian or skew-Hermitian: all we use it on) ‖y a‖/‖y‖ ≤ ‖a‖₂, and empirically
    # ‖a‖₂ ≤ √2 × this bound.
    tiny = jnp.finfo(real_dtype(a.dtype)).smallest_normal
    j = jnp.argmax(_row_norms(a))
    y = a[j] @ a
    return _row_norms((y @ a)[None])[0] / (_row_norms(y[None])[0] + tiny)


class Normaliser(eqx.Module):
    """How the step size of every factor update is normalised.

    Hashable, all-static configuration (no arrays), so it can live in static fields and be
    closed over by jitted functions.

    **Arguments:**

    - `beta`: EMA factor β_L of the Lipschitz estimate, `L ← max(β L + (1−β) ℓ, ℓ)`. `0.0`
        gives the instantaneous normaliser `L = ℓ` (psgd_jax, kron_torch); the reference uses
        `0.9`; raise it (e.g. `0.999`) for very sparse gradients.
    - `bound`: the spectral-norm lower bound ℓ of a dense statistic: `"subspace"` (the
        reference's subspace iteration, `k` random rows, `half_iters` double-products) or
        `"one_step"` (psgd_jax's single power step; deterministic, cheapest).
    - `k`: subspace dimension for `"subspace"` (32 for f32, ~128 suggested for bf16).
    - `half_iters`: number of half-iterations for `"subspace"` (each applies the matrix twice).
    """

    beta: float = eqx.field(static=True, default=0.9)
    bound: str = eqx.field(static=True, default="subspace")
    k: int = eqx.field(static=True, default=32)
    half_iters: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not (0.0 <= self.beta < 1.0):
            raise ValueError(f"`lipschitz_beta` must be in [0, 1); got {self.beta!r}.")
        if self.bound not in ("subspace", "one_step"):
            raise ValueError(
                f"`norm_bound` must be 'subspace' or 'one_step'; got {self.bound!r}."
            )
        if self.k < 1:
            raise ValueError(f"`norm_bound_k` must be >= 1; got {self.k!r}.")
        if self.half_iters < 1:
            raise ValueError(f"`norm_bound_iters` must be >= 1; got {self.half_iters!r}.")

    def norm_lower_bound(self, a: Array, key: PRNGKeyArray) -> Float[Array, ""]:
        """A lower bound of the spectral norm ‖a‖₂ of a normal (Hermitian or skew-Hermitian)
        matrix, in the real compute dtype.

        **Arguments:**

        - `a`: a square matrix.
        - `key`: randomness for the subspace start (unused by `"one_step"`).

        **Returns:** a non-negative scalar, `0` for the zero matrix.
        """
        a = a.astype(compute_dtype(a.dtype))
        # Normalise first: the bound squares entries, so large statistics would overflow.
        scale = jnp.max(jnp.abs(a))
        safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
        a = a / safe.astype(a.dtype)
        if self.bound == "subspace":
            # More rows than the matrix has columns add nothing (the XMat 2×2 blocks).
            lb = _subspace_bound(a, key, min(self.k, a.shape[-1]), self.half_iters)
        else:
            lb = _one_step_bound(a)
        return jnp.where(scale > 0, scale * lb, jnp.zeros_like(scale))

    def lipschitz(self, old: Float[Array, ""], ell: Float[Array, ""]) -> Float[Array, ""]:
        """The new Lipschitz estimate `max(β L + (1 − β) ℓ, ℓ)` (just `ℓ` when β = 0).

        **Arguments:**

        - `old`: the previous estimate L (f32 scalar).
        - `ell`: this step's norm bound ℓ.

        **Returns:** the new L, in the dtype of `old`.
        """
        ell = ell.astype(old.dtype)
        if self.beta == 0.0:
            return ell
        return jnp.maximum(self.beta * old + (1.0 - self.beta) * ell, ell)

    def step(
        self, old: Float[Array, ""], ell: Float[Array, ""], lr
    ) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """The new Lipschitz estimate L and the normalised step η = μ/L of one factor.

        **Arguments:**

        - `old`: the previous estimate L (real scalar; sets the dtype of the results).
        - `ell`: this step's norm bound ℓ.
        - `lr`: the preconditioner learning rate μ.

        **Returns:** `(L, η)`; η is finite even when L = 0.
        """
        big_l = self.lipschitz(old, ell)
        tiny = jnp.finfo(big_l.dtype).tiny
        return big_l, jnp.asarray(lr).astype(big_l.dtype) / jnp.maximum(big_l, tiny)
