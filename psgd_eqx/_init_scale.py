"""The data-driven init: Q = scale·I from the first gradient (or the first (v, Hv) pair).

The scale is global over all leaves and computed on device at step 0 inside the update, so
the user need not guess the gradients' magnitude; it falls back to 1.0 when the inputs are
zero or non-finite.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._numerics import tree_all_finite


def grad_stats(g: Array) -> tuple[Float[Array, ""], Bool[Array, ""]]:
    """One leaf's part of the whitening scale: `(log mean|g|⁴, g ≠ 0)`, in f32 and
    overflow-safe (the max-abs is factored out: 1e30 gradients would overflow |g|⁴)."""
    a = jnp.abs(g).astype(jnp.float32)
    m = jnp.max(a)
    safe_m = jnp.where(m > 0, m, 1.0)
    r = jnp.mean(jnp.square(jnp.square(a / safe_m)))
    return jnp.where(m > 0, 4.0 * jnp.log(safe_m) + jnp.log(r), -jnp.inf), m > 0


def scale_from_grad_stats(
    logs: Float[Array, " n"], nonzero: Bool[Array, " n"], finite: Bool[ArrayLike, ""],
    damping: float | ArrayLike,
) -> Float[Array, ""]:
    """scale = (max_i mean|g_i|⁴ + δ⁴)^(−1/8) from every leaf's [`grad_stats`][]; 1.0 when
    every gradient is zero or anything is non-finite (a zero first gradient must not give
    NaNs)."""
    log_d4 = 4.0 * jnp.log(jnp.asarray(damping, jnp.float32))
    scale = jnp.exp(-jnp.logaddexp(jnp.max(logs), log_d4) / 8.0)
    ok = jnp.any(nonzero) & jnp.isfinite(scale) & finite
    return jnp.where(ok, scale, jnp.ones((), jnp.float32))


def init_scale_from_grads(
    grads: PyTree[Array], damping: float | ArrayLike = 1e-9
) -> Float[Array, ""]:
    """The reference's global data-driven init scale, in f32 and overflow-safe.

    scale = (max_i mean|g_i|⁴ + δ⁴)^(−1/8), so that Q = scale·I gives P = scale²·I ≈
    E[ggᴴ]^(−1/2) in magnitude. Falls back to 1.0 when every gradient is zero or anything
    is non-finite.

    **Arguments:**

    - `grads`: the first gradients (any pytree of arrays).
    - `damping`: δ.

    **Returns:** the scale, an f32 scalar.
    """
    leaves = [g for g in jax.tree.leaves(grads) if g.size > 0]
    if not leaves:
        return jnp.ones((), jnp.float32)
    logs, nonzero = zip(*(grad_stats(g) for g in leaves))
    return scale_from_grad_stats(jnp.stack(logs), jnp.stack(nonzero),
                                 tree_all_finite(leaves), damping)


def log_sum_abs2(x: Array) -> Float[Array, ""]:
    """log Σ|x|² of one leaf, in f32 and overflow-safe (max-abs factored out)."""
    a = jnp.abs(x).astype(jnp.float32)
    m = jnp.max(a)
    safe_m = jnp.where(m > 0, m, 1.0)
    r = jnp.sum(jnp.square(a / safe_m))
    return jnp.where(m > 0, 2.0 * jnp.log(safe_m) + jnp.log(r), -jnp.inf)


def scale_from_hvp_logs(
    v_logs: Float[Array, " n"], h_logs: Float[Array, " n"], finite: Bool[ArrayLike, ""]
) -> Float[Array, ""]:
    """(Σ|v|² / Σ|Hv|²)^(1/4) from every leaf's [`log_sum_abs2`][] of v and Hv; 1.0 when
    Hv is zero or anything is non-finite."""
    log_ratio = jax.scipy.special.logsumexp(v_logs) - jax.scipy.special.logsumexp(h_logs)
    scale = jnp.exp(0.25 * log_ratio)
    ok = jnp.isfinite(scale) & (scale > 0) & finite
    return jnp.where(ok, scale, jnp.ones((), jnp.float32))


def init_scale_from_hvp(vectors: PyTree[Array], hvps: PyTree[Array]) -> Float[Array, ""]:
    """The Newton-fit init scale (Σ|v|² / Σ|Hv|²)^(1/4), global over all leaves, in f32.

    Q = scale·I then gives P = scale²·I = H⁻¹ exactly when H = c·I (psgd_jax's rule, which
    makes a quadratic converge in one step). Falls back to 1.0 when Hv is zero or anything
    is non-finite.

    **Arguments:**

    - `vectors`: the probes v; `hvps`: the products Hv (pytrees of arrays).

    **Returns:** the scale, an f32 scalar.
    """
    vs = [x for x in jax.tree.leaves(vectors) if x.size > 0]
    hs = [x for x in jax.tree.leaves(hvps) if x.size > 0]
    if not vs or not hs:
        return jnp.ones((), jnp.float32)
    finite = tree_all_finite(vs) & tree_all_finite(hs)
    return scale_from_hvp_logs(jnp.stack([log_sum_abs2(x) for x in vs]),
                               jnp.stack([log_sum_abs2(x) for x in hs]), finite)
