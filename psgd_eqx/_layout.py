"""The state's layout: per-leaf values stored once per bucket of identical leaves.

`update` runs every part of the step once per bucket of identical leaves (`_bucket.Groups`).
If the state kept one array per leaf, every step would stack each bucket's preconditioners
and momenta on the way in and slice them apart on the way out: a few ops *per leaf* in the
compiled step, which is what made compile time and per-step overhead grow with the number
of leaves instead of the number of distinct shapes. So the state stores the stacks
themselves: [`psgd_eqx.LeafBuckets`][] holds, per bucket, its members' values stacked on a
new leading axis (a bucket of one keeps its value as is), and the per-leaf view is
computed only when someone asks for it (`tree()`, `leaves()`, or
[`psgd_eqx.PSGDState.preconditioner`][]).

The buckets are fixed at `init` (from the preconditioner's structure and the parameter's
shape and dtype), so a checkpoint's layout does not depend on the gradients.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PyTree

from ._bucket import Groups
from ._mesh import take_row
from ._owned import owner_size  # noqa: F401  (re-exported: the layout's owner count)


def _is_p(x) -> bool:
    return isinstance(x, P)


def _row(x, j: int):
    """Member `j` of a stacked value: an array's row, a shape's tail, a spec's tail."""
    if isinstance(x, P):  # a spec of a stack: the stack axis is its first entry
        return P(*tuple(x)[1:])
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return take_row(x, j)


def _shape_of(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x


class LeafBuckets(eqx.Module):
    """Values of a model's parameter leaves, stored per bucket of identical leaves.

    This is how [`psgd_eqx.PSGDState`][] keeps its per-leaf fields (`precond`, `mu`): a
    bucket is a set of leaves whose values have the same structure, shapes and dtypes
    (e.g. every layer's query weight), stored as one stack. Read the per-leaf values with
    `tree()` (a pytree like the params) or `leaves()` (a list in flattening order).

    **Fields:**

    - `stacks`: one entry per bucket: its members' values stacked along a new leading
        axis, or the one member's value for a bucket of one.
    - `loose`: one entry per leaf: the value of a leaf that is in no bucket (an integer
        or boolean parameter, which is not trained), `None` for a bucketed leaf.
    - `index`: (static) per bucket, its members' leaf indices in flattening order.
    - `treedef`: (static) the params' tree structure.
    - `pad`: (static) per bucket, how many inert members its stack holds besides the
        real ones (owner-computes sharding pads a stack to a multiple of the devices that
        share it); empty when nothing is padded.
    - `owner`: (static) the mesh axes the stacks of two or more members are sharded over
        (owner-computes sharding), or `None` (placement sharding).
    - `slots`: (static) per bucket, the stack row of each member (owner-computes packs
        the members of all buckets across the devices, `_packing.py`); empty when every
        bucket keeps its members in order with the padding after them.
    """

    stacks: tuple
    loose: tuple
    index: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)
    pad: tuple[int, ...] = eqx.field(static=True, default=())
    owner: tuple[str, ...] | None = eqx.field(static=True, default=None)
    slots: tuple[tuple[int, ...], ...] = eqx.field(static=True, default=())

    @classmethod
    def build(cls, values: Sequence[Any], groups: Groups, treedef,
              owner: tuple[str, ...] | None = None) -> "LeafBuckets":
        """Store per-leaf `values` (flattening order) in the buckets of `groups`.

        **Arguments:**

        - `values`: one value per leaf; members of a bucket must have equal structure,
            shapes and dtypes.
        - `groups`: the buckets (a `_bucket.Groups`, with its padding); padding rows are
            copies of the first member (at `init`: an identity preconditioner).
        - `treedef`: the params' tree structure.
        - `owner`: see the field.

        **Returns:** a `LeafBuckets`.
        """
        grouped = {i for idx in groups.index for i in idx}
        loose = tuple(None if i in grouped else v for i, v in enumerate(values))
        pad = tuple(groups.pads) if any(groups.pads) else ()
        slots = () if groups.trailing() else tuple(groups.slots)
        return cls(tuple(groups.stack(values, pad_with="first")), loose,
                   tuple(tuple(idx) for idx in groups.index), treedef, pad, owner, slots)

    @property
    def groups(self) -> Groups:
        """The buckets as a `_bucket.Groups`."""
        return Groups.from_index(len(self.loose), self.index, self.pad or None,
                                 self.slots or None, self.owner)

    def _like(self, stacks, loose=None) -> "LeafBuckets":
        """The same layout (static fields) holding other values."""
        return LeafBuckets(tuple(stacks), self.loose if loose is None else loose,
                           self.index, self.treedef, self.pad, self.owner, self.slots)

    def with_stacks(self, stacks: Sequence[Any]) -> "LeafBuckets":
        """The same layout holding new per-bucket values."""
        return self._like(stacks)

    def leaves(self) -> list[Any]:
        """Every leaf's value, in flattening order (slices of the stacks)."""
        out = list(self.loose)
        slots = self.groups.slots
        for g, (idx, stack) in enumerate(zip(self.index, self.stacks)):
            if len(idx) == 1:
                out[idx[0]] = stack
                continue
            for j, i in enumerate(idx):
                row = slots[g][j]
                out[i] = jax.tree.map(lambda x, k=row: _row(x, k), stack, is_leaf=_is_p)
        return out

    def tree(self) -> PyTree:
        """The per-leaf values as a pytree like the params."""
        return jax.tree.unflatten(self.treedef, self.leaves())

    def shapes(self) -> list[Any]:
        """Every leaf's value with `jax.ShapeDtypeStruct`s for arrays, computed without
        slicing anything (what input checks read)."""
        return self._like(jax.tree.map(_shape_of, self.stacks),
                          jax.tree.map(_shape_of, self.loose)).leaves()

    def map_members(self, fn: Callable[[Any, int], Any],
                    merge: Callable[[list[Any]], Any]) -> "LeafBuckets":
        """A new `LeafBuckets` from per-leaf results: `fn(leaf value, leaf index)` per
        leaf (on the `shapes()` view), combined per bucket by `merge(list of results)`
        (the results of a bucket of one are kept as they are)."""
        views = self.shapes()
        stacks = []
        for idx in self.index:
            per = [fn(views[i], i) for i in idx]
            stacks.append(per[0] if len(idx) == 1 else merge(per))
        loose = tuple(None if v is None else fn(v, i) for i, v in enumerate(self.loose))
        return self._like(stacks, loose)


def as_layout(precond: Any, treedef) -> LeafBuckets:
    """The state's `precond` as a `LeafBuckets`. A params tree without leaves (e.g. the
    single placeholder of `optax.tree_map_params`) has no buckets: `init` keeps its
    (array-free) tree as is, so that `tree_map_params` finds the params' structure."""
    if isinstance(precond, LeafBuckets):
        return precond
    return LeafBuckets((), tuple([None] * treedef.num_leaves), (), treedef)


def owner_axes(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The `owner_axes` option as a tuple of mesh axis names (or `None`)."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def pin_stacks(per_group: list[Any], groups: Groups, owner: tuple[str, ...] | None
               ) -> list[Any]:
    """Owner-computes sharding: every array of a stack (a group of two or more) sharded
    along its stack axis over `owner`, the rest of it whole on its owner. XLA's SPMD
    partitioner then moves each bucket's inputs to their owners with one all-to-all, and
    the vmapped refit and apply run on the owned rows only. `owner=None`: unchanged."""
    if owner is None:
        return list(per_group)
    spec = P(owner)
    return [jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), v)
            if groups.stacked(g) else v for g, v in enumerate(per_group)]


def _packed(fields: list[Array | None]) -> list[list[int]]:
    """Which of a leaf's arrays travel together: equal dtypes (they share the shape)."""
    by_dtype: dict = {}
    for f, x in enumerate(fields):
        if x is not None:
            by_dtype.setdefault(jnp.result_type(x), []).append(f)
    return list(by_dtype.values())


def stack_inputs(items: list, groups: Groups, owner: tuple[str, ...] | None) -> list[list]:
    """Per-leaf tuples of inputs (gradient, momentum, ...) → one list per field of
    per-group values (stacks for groups of two or more).

    With owner-computes sharding, a leaf's inputs of one dtype are stacked together
    before its bucket is stacked, so that each bucket reaches its owners with *one*
    all-to-all (XLA moves each stacked array separately), then split apart there.
    """
    width = next((len(it) for it in items if it is not None), 0)
    per_group = groups.stack(items) if owner is None else None
    if owner is None:
        return [list(c) for c in zip(*per_group)] or [[] for _ in range(width)]
    cols: list[list] = [[None] * len(groups.index) for _ in range(width)]
    for g, idx in enumerate(groups.index):
        if not groups.stacked(g):
            for f in range(width):
                cols[f][g] = items[idx[0]][f]
            continue
        for fs in _packed(list(items[idx[0]])):
            real = [jnp.stack([items[i][f] for f in fs]) for i in idx]
            rows = [jnp.zeros_like(real[0])] * groups.size(g)
            for j, row in enumerate(real):
                rows[groups.slots[g][j]] = row
            stack = jax.lax.with_sharding_constraint(jnp.stack(rows), P(owner))
            for j, f in enumerate(fs):
                cols[f][g] = stack[:, j]
    return cols


def unstack_outputs(per_group: list[list], groups: Groups,
                    owner: tuple[str, ...] | None) -> list[list]:
    """The inverse of `stack_inputs` for outputs: one list of per-group values per field
    → one list of per-leaf values per field (`None` for leaves in no group). With
    owner-computes sharding a leaf's outputs of one dtype travel back together (one
    all-to-all per bucket)."""
    if owner is None:
        return [groups.unstack(v) for v in per_group]
    out: list[list] = [[None] * groups.n for _ in per_group]
    for g, idx in enumerate(groups.index):
        if not groups.stacked(g):
            for f, v in enumerate(per_group):
                out[f][idx[0]] = v[g]
            continue
        for fs in _packed([v[g] for v in per_group]):
            stack = jnp.stack([per_group[f][g] for f in fs], axis=1)
            stack = jax.lax.with_sharding_constraint(stack, P(owner))
            for j, i in enumerate(idx):
                for k, f in enumerate(fs):
                    out[f][i] = stack[groups.slots[g][j], k]
    return out


def leaf_index(treedef, path: Any) -> int:
    """The flattening-order index of the leaf at `path` (a key path, or its `keystr`)."""
    dummy = jax.tree.unflatten(treedef, list(range(treedef.num_leaves)))
    for p, i in jax.tree_util.tree_flatten_with_path(dummy)[0]:
        if p == path or jax.tree_util.keystr(p) == path:
            return i
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dummy)[0]]
    raise KeyError(f"No parameter at {path!r}; the paths are: {', '.join(names)}.")


def stack_specs(specs: list[Any]) -> Any:
    """One spec tree for a stack from its members' spec trees: the stack axis is
    replicated, and a dimension is sharded only where every member shards it alike."""

    def merge(*ps):
        n = max(len(p) for p in ps)
        cols = [[tuple(p)[d] if d < len(p) else None for p in ps] for d in range(n)]
        return P(None, *(c[0] if all(x == c[0] for x in c) else None for c in cols))

    return jax.tree.map(merge, *specs, is_leaf=_is_p)

