"""The global group: one preconditioner over the concatenation of several leaves.

A `structure` that returns `GLOBAL` for a leaf puts it into the group; the group's
preconditioner (built by `global_structure(n, dtype)`) acts on the row-major flattening of
its leaves, concatenated in flattening order. In the state, such a leaf's entry of
`precond` is a `GlobalSlot` (no arrays), so which leaves are global is part of the state's
structure and needs no separate mask.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from ._numerics import promote


GLOBAL = "global"
"""Return this from a `structure` callable to put a leaf into the global group: one
preconditioner (built by `global_structure`) over the concatenation of all such leaves."""


class GlobalSlot(eqx.Module):
    """The `precond` entry of a leaf that belongs to the global group (holds no arrays)."""


def is_slot(x) -> bool:
    return isinstance(x, GlobalSlot)


def concat(leaves: list[Array]) -> Array:
    """Row-major flattening of several leaves into one vector, in their common dtype."""
    dtype = promote(*(x.dtype for x in leaves))
    return jnp.concatenate([x.reshape(-1).astype(dtype) for x in leaves])


def split(flat: Array, like: list[Array]) -> list[Array]:
    """Inverse of `concat`: pieces with the shapes and dtypes of `like`."""
    out, start = [], 0
    for x in like:
        out.append(flat[start : start + x.size].reshape(x.shape).astype(x.dtype))
        start += x.size
    return out


def members(preconds: list) -> list[int]:
    """The indices (in flattening order) of the leaves in the global group."""
    return [i for i, q in enumerate(preconds) if is_slot(q)]
