"""Precondition and clip: the update of every leaf is clip(P·m).

The clip is per tensor (per layer of a scanned stack): first an RMS ceiling, then an
element-wise bound (a magnitude bound for complex updates). Leaves without a
preconditioner get the clipped momentum.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from ._numerics import abs2, safe_rms
from ._precond.stacked import StackedQ


def clip(u: Array, max_rms: ArrayLike | None, max_element: ArrayLike | None) -> Array:
    """`u` scaled down to RMS ≤ `max_rms`, then clipped to |uᵢ| ≤ `max_element`
    (`None` skips a bound)."""
    if u.size == 0:
        return u
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


def clip_leaf(q, u: Array, max_rms: ArrayLike | None, max_element: ArrayLike | None
              ) -> Array:
    """`clip` of one leaf's update; a scanned stack ([`psgd_eqx.StackedQ`][]) is clipped
    layer by layer, so one layer's gradient never changes another layer's update."""
    if isinstance(q, StackedQ):
        return jax.vmap(lambda x: clip(x, max_rms, max_element))(u)
    return clip(u, max_rms, max_element)


def apply_leaf(q, m: Array, max_rms: ArrayLike | None, max_element: ArrayLike | None
               ) -> Array:
    """clip(P·m) of one leaf (clip(m) without a preconditioner)."""
    return clip_leaf(q, m if q is None else q.apply(m), max_rms, max_element)
