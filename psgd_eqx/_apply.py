"""Precondition and clip: the update of every leaf is clip(P·m).

The clip is in one of three styles: `"rms_element"` (default), per tensor (per layer of a
scanned stack): first an RMS ceiling, then an element-wise bound (a magnitude bound for
complex updates); `"soft"`: HeavyBall's smooth, sign-preserving trust region,
element-wise; `"global_norm"`: the whole update (every leaf) scaled down to a global L2
norm bound, by the step after the per-leaf part (`global_norm_factor`). Leaves without a
preconditioner get the clipped momentum.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._numerics import abs2, safe_rms
from ._precond.stacked import StackedQ


CLIP_STYLES = ("rms_element", "soft", "global_norm")
# HeavyBall's trust region: s·((1 − λ)·sign(x)·log1p(|x|/s) + λ·tanh(x/s)), clamped to ±2
_SOFT_SCALE, _SOFT_LERP, _SOFT_BOUND = 1.5, 0.9, 2.0


def soft_clip(u: Array) -> Array:
    """HeavyBall's soft trust-region clip, element-wise: ≈ uᵢ near 0 (slope 1), growing
    like a logarithm beyond ≈ 1, never past ±2, signs kept; on the magnitude of a
    complex element."""
    if jnp.issubdtype(u.dtype, jnp.complexfloating):
        mag = jnp.sqrt(abs2(u))
        safe = jnp.where(mag > 0, mag, 1.0)
        return u * (soft_clip(mag) / safe).astype(u.dtype)
    x = u.astype(jnp.promote_types(u.dtype, jnp.float32)) / _SOFT_SCALE
    y = (1.0 - _SOFT_LERP) * jnp.sign(x) * jnp.log1p(jnp.abs(x)) + _SOFT_LERP * jnp.tanh(x)
    return jnp.clip(_SOFT_SCALE * y, -_SOFT_BOUND, _SOFT_BOUND).astype(u.dtype)


def clip(u: Array, max_rms: ArrayLike | None, max_element: ArrayLike | None,
         style: str = "rms_element") -> Array:
    """`u` scaled down to RMS ≤ `max_rms`, then clipped to |uᵢ| ≤ `max_element`
    (`None` skips a bound); with `style="soft"`, [`soft_clip`][] instead (the two
    bounds are not used)."""
    if u.size == 0 or style == "global_norm":  # that one acts on the whole update at once
        return u
    if style == "soft":
        return soft_clip(u)
    if max_rms is not None:
        rms = safe_rms(u)
        target = jnp.asarray(max_rms).astype(rms.dtype)
        factor = jnp.where(rms > target, target / jnp.where(rms > 0, rms, 1.0), 1.0)
        u = u * factor.astype(u.dtype)
    if max_element is not None:
        if jnp.issubdtype(u.dtype, jnp.complexfloating):
            mag = jnp.sqrt(abs2(u))
            bound = jnp.asarray(max_element).astype(mag.dtype)
            u = u / jnp.maximum(mag / bound, 1.0).astype(u.dtype)
        else:
            bound = jnp.asarray(max_element).astype(u.dtype)
            u = jnp.clip(u, -bound, bound)
    return u


def clip_leaf(q, u: Array, max_rms: ArrayLike | None, max_element: ArrayLike | None,
              style: str = "rms_element") -> Array:
    """`clip` of one leaf's update; a scanned stack ([`psgd_eqx.StackedQ`][]) is clipped
    layer by layer, so one layer's gradient never changes another layer's update."""
    if isinstance(q, StackedQ):
        return jax.vmap(lambda x: clip(x, max_rms, max_element, style))(u)
    return clip(u, max_rms, max_element, style)


def global_norm_factor(updates: list[Array], bound: ArrayLike) -> Array:
    """The factor min(1, bound / ‖u‖) that brings the global L2 norm of all `updates` (every
    leaf's, or a stack of leaves') to at most `bound` (f32; 1 for an all-zero update)."""
    total = sum((jnp.sum(abs2(u).astype(jnp.float32)) for u in updates if u.size),
                jnp.zeros((), jnp.float32))
    norm = jnp.sqrt(total)
    target = jnp.asarray(bound, jnp.float32)
    return jnp.where(norm > target, target / jnp.where(norm > 0, norm, 1.0), 1.0)
