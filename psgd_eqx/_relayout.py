"""Move an optimizer state between sharding modes or owner sizes (after a restore).

Owner-computes sharding pads every bucket's stack to a multiple of the devices that share
it (`_layout.LeafBuckets.pad`), so a state saved from 8 devices has stacks of 8ᵏ rows and
does not fit an optimizer built for 4 devices (or for placement sharding, which pads
nothing). The real rows are the same in every layout; only the inert padding differs. So a
checkpoint is restored with its own shapes (any mesh, any sharding) and then re-padded
here for the optimizer it will be used with.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._bucket import Groups
from ._layout import LeafBuckets, owner_axes as as_owner_axes, owner_size
from ._transform import PSGDState


def _repad_stack(stack, members: int, pad: int):
    """The first `members` rows of a stack, then `pad` copies of its first row."""
    def one(a):
        real = a[:members]
        if not pad:
            return real
        return jnp.concatenate([real, jnp.repeat(real[:1], pad, axis=0)])

    return jax.tree.map(one, stack)


def _repadded(layout: LeafBuckets, owner, size: int | None):
    groups = Groups.from_index(len(layout.loose), layout.index)
    new = groups.padded_to(size) if owner is not None else groups
    stacks = tuple(
        _repad_stack(stack, len(idx), pad) if len(idx) > 1 else stack
        for stack, idx, pad in zip(layout.stacks, layout.index, new.pads)
    )
    pads = tuple(new.pads) if any(new.pads) else ()
    return dataclasses.replace(layout, stacks=stacks, pad=pads, owner=owner), new.pads


def relayout_owner_state(state: PyTree, owner_axes=None, *, size: int | None = None) -> PyTree:
    """Re-pad a restored optimizer state for another owner size or sharding mode.

    Use it after restoring a checkpoint saved in owner-computes mode onto a different
    number of devices (or into placement mode, or the other way round): restore with the
    checkpoint's own shapes, call this under the new mesh, then place the result with
    [`psgd_eqx.get_opt_state_partition_specs`][] of the new optimizer. Only the inert
    padding rows of each bucket's stack change: every parameter's preconditioner (and the
    adaptive schedule's state) is carried over exactly.

    **Arguments:**

    - `state`: the optimizer state (an `optax.chain`'s tuple, or a `PSGDState`).
    - `owner_axes`: the new optimizer's `owner_axes` (`None` = placement mode: no padding).
    - `size`: the number of devices that share a stack; default: the product of
        `owner_axes`' sizes in the mesh set with `jax.set_mesh`.

    **Returns:** the state with the new layout (its arrays are wherever the old ones
    were; place it with the new partition specs).
    """
    owner = as_owner_axes(owner_axes)
    if owner is not None and size is None:
        size = owner_size(owner)

    def one(st):
        if not isinstance(st, PSGDState) or not isinstance(st.precond, LeafBuckets):
            return st
        precond, pads = _repadded(st.precond, owner, size)
        staleness = st.staleness
        if staleness is not None:
            debias, emas = staleness
            index = st.precond.index
            emas = tuple(
                tuple(_repad_stack(e, len(index[g]), pads[g]) for e in es)
                if g < len(index) and len(index[g]) > 1 else es
                for g, es in enumerate(emas))
            staleness = (debias, emas)
        return dataclasses.replace(st, precond=precond, staleness=staleness)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, PSGDState))
