"""Precondition and clip: the update of every leaf is clip(P·m).

The clip is per tensor: first an RMS ceiling, then an element-wise bound (a magnitude
bound for complex updates). Leaves without a preconditioner get the clipped momentum.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from . import _global
from ._bucket import bucketed_map
from ._numerics import abs2, safe_rms


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


def precondition(
    preconds: tuple[list, object],
    momenta: list[Array],
    members: list[int],
    max_rms: ArrayLike | None,
    max_element: ArrayLike | None,
    bucket: bool,
) -> list[Array]:
    """clip(P·m) for every leaf: per-leaf preconditioners (bucketed when `bucket`), the
    global group's one over its concatenated leaves, and plain clipped momentum elsewhere.
    """
    qs, gq = preconds

    def one(q, m):
        return clip(q.apply(m), max_rms, max_element)

    items = [None if q is None else (q, m) for q, m in zip(qs, momenta)]
    out = bucketed_map(one, items, bucket)
    out = [clip(m, max_rms, max_element) if q is None else u
           for q, m, u in zip(qs, momenta, out)]
    if gq is not None:
        like = [momenta[i] for i in members]
        flat = gq.apply(_global.concat(like))
        for i, u in zip(members, _global.split(flat, like)):
            out[i] = clip(u, max_rms, max_element)
    return out
