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
import numpy as np
from jaxtyping import PyTree

from ._bucket import Groups
from ._layout import LeafBuckets, owner_axes as as_owner_axes, owner_size
from ._packing import member_cost
from ._transform import PSGDState


def _reslot(stack, old_rows: tuple[int, ...], new_rows: tuple[int, ...], size: int):
    """A stack whose members sit at `old_rows`, rebuilt with them at `new_rows` of `size`
    rows; the other (padding) rows are copies of the first member."""
    src = [old_rows[0]] * size
    for j, row in enumerate(new_rows):
        src[row] = old_rows[j]
    if [a.shape[0] for a in jax.tree.leaves(stack)][:1] == [size] and src == list(range(size)):
        return stack  # the same layout
    ids = np.asarray(src, np.int32)
    return jax.tree.map(lambda a: a[ids], stack)


def owner_groups(layout: LeafBuckets, size: int) -> Groups:
    """The buckets of `layout` padded and packed for `size` owners."""
    plain = Groups.from_index(len(layout.loose), layout.index)
    views = layout.shapes()
    return plain.padded_to(size, [member_cost(views[idx[0]]) for idx in layout.index])


def _repadded(layout: LeafBuckets, owner, size: int | None):
    old = layout.groups
    new = owner_groups(layout, size) if owner is not None else Groups.from_index(
        len(layout.loose), layout.index)
    stacks = tuple(
        _reslot(stack, old.slots[g], new.slots[g], new.size(g)) if old.stacked(g) else stack
        for g, stack in enumerate(layout.stacks)
    )
    pads = tuple(new.pads) if any(new.pads) else ()
    slots = () if new.trailing() else tuple(new.slots)
    return dataclasses.replace(layout, stacks=stacks, pad=pads, owner=owner,
                               slots=slots), (old, new)


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
        precond, (old, new) = _repadded(st.precond, owner, size)
        staleness = st.staleness
        if staleness is not None:
            debias, emas = staleness
            n_groups = len(old.index)
            emas = tuple(
                tuple(_reslot(e, old.slots[g], new.slots[g], new.size(g)) for e in es)
                if g < n_groups and old.stacked(g) else es
                for g, es in enumerate(emas))
            staleness = (debias, emas)
        return dataclasses.replace(st, precond=precond, staleness=staleness)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, PSGDState))
