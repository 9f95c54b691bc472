"""The data-driven init: Q = scale·I from the first gradient (or the first (v, Hv) pair).

The scale is global over all leaves and computed on device at step 0 inside the update, so
the user need not guess the gradients' magnitude; it falls back to 1.0 when the inputs are
zero or non-finite.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._numerics import tree_all_finite


def init_scale_from_grads(
    grads: PyTree[Array], damping: float | ArrayLike = 1e-9
) -> Float[Array, ""]:
    """The reference's global data-driven init scale, in f32 and overflow-safe.

    scale = (max_i mean|g_i|⁴ + δ⁴)^(−1/8), so that Q = scale·I gives P = scale²·I ≈
    E[ggᴴ]^(−1/2) in magnitude. Computed in the log domain with the max-abs factored out:
    1e30 gradients would overflow |g|⁴ in f32. Falls back to 1.0 when every gradient is
    zero or anything is non-finite (a zero first gradient must not give NaNs).
    """
    leaves = [g for g in jax.tree.leaves(grads) if g.size > 0]
    if not leaves:
        return jnp.ones((), jnp.float32)
    logs = []
    any_nonzero = []
    for g in leaves:
        a = jnp.abs(g).astype(jnp.float32)
        m = jnp.max(a)
        safe_m = jnp.where(m > 0, m, 1.0)
        r = jnp.mean(jnp.square(jnp.square(a / safe_m)))
        logs.append(jnp.where(m > 0, 4.0 * jnp.log(safe_m) + jnp.log(r), -jnp.inf))
        any_nonzero.append(m > 0)
    log_m4 = jnp.max(jnp.stack(logs))
    log_d4 = 4.0 * jnp.log(jnp.asarray(damping, jnp.float32))
    log_total = jnp.logaddexp(log_m4, log_d4)
    scale = jnp.exp(-log_total / 8.0)
    ok = jnp.any(jnp.stack(any_nonzero)) & jnp.isfinite(scale) & tree_all_finite(leaves)
    return jnp.where(ok, scale, jnp.ones((), jnp.float32))


def _log_sum_abs2(leaves: list[Array]) -> Float[Array, ""]:
    """log Σ|x|² over all leaves, in f32 and overflow-safe (max-abs factored out)."""
    logs = []
    for x in leaves:
        a = jnp.abs(x).astype(jnp.float32)
        m = jnp.max(a)
        safe_m = jnp.where(m > 0, m, 1.0)
        r = jnp.sum(jnp.square(a / safe_m))
        logs.append(jnp.where(m > 0, 2.0 * jnp.log(safe_m) + jnp.log(r), -jnp.inf))
    return jax.scipy.special.logsumexp(jnp.stack(logs))


def init_scale_from_hvp(vectors: PyTree[Array], hvps: PyTree[Array]) -> Float[Array, ""]:
    """The Newton-fit init scale (Σ|v|² / Σ|Hv|²)^(1/4), global over all leaves, in f32.

    Q = scale·I then gives P = scale²·I = H⁻¹ exactly when H = c·I (psgd_jax's rule, which
    makes a quadratic converge in one step). Falls back to 1.0 when Hv is zero or anything
    is non-finite.
    """
    vs = [x for x in jax.tree.leaves(vectors) if x.size > 0]
    hs = [x for x in jax.tree.leaves(hvps) if x.size > 0]
    if not vs or not hs:
        return jnp.ones((), jnp.float32)
    log_ratio = _log_sum_abs2(vs) - _log_sum_abs2(hs)
    scale = jnp.exp(0.25 * log_ratio)
    ok = jnp.isfinite(scale) & (scale > 0) & tree_all_finite(vs) & tree_all_finite(hs)
    return jnp.where(ok, scale, jnp.ones((), jnp.float32))


def rescale_at_first_step(
    count: Int[Array, ""],
    preconds: tuple[list, object],
    *,
    newton: bool,
    grads: list[Array],
    vectors: list,
    fit_inputs: list[Array],
    damping: ArrayLike,
) -> tuple[list, object]:
    """At step 0, every preconditioner (and the global one) times the data-driven scale.

    **Arguments:**

    - `count`: the step count (the rescale happens where it is 0, inside a `lax.cond`).
    - `preconds`: `(per-leaf preconditioners or None, global preconditioner or None)`.
    - `newton`: scale from the (v, Hv) pair instead of the gradients.
    - `grads`, `vectors`, `fit_inputs`: the gradients, the probes v and the Hv (Newton).
    - `damping`: δ of the whitening rule.

    **Returns:** the preconditioners, rescaled at step 0.
    """

    def rescale(qs_gq):
        qs, gq = qs_gq
        if newton:
            scale = init_scale_from_hvp(vectors, fit_inputs)
        else:
            scale = init_scale_from_grads(grads, damping)
        qs = [None if q is None else q.rescale(scale) for q in qs]
        return qs, (None if gq is None else gq.rescale(scale))

    qs, gq = preconds
    return jax.lax.cond(count == 0, rescale, lambda x: (list(x[0]), x[1]), (list(qs), gq))
