"""Same-shape bucketing: one batched call per group of identical leaves.

A transformer that is not scanned has tens of leaves with the same shape (every layer's
query, key, value, ... weights), so their preconditioners have identical structure. Calling
`update`/`apply` once per leaf puts one chain of small ops per leaf into the step's XLA
graph; stacking identical items and running the call under one `vmap` puts in one chain
per *bucket*, with the per-leaf arrays stacked on the way in and sliced on the way out.
The preconditioners are stored stacked per bucket in the state (`_layout.py`), so only the
other inputs are stacked per step; every item keeps its own PRNG key, so bucketed and
per-leaf results agree up to float rounding.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ._owned import owned_map, owner_size
from ._packing import device_rows, pack


def signature(item: Any) -> tuple:
    """Items with equal signatures can be stacked: same tree structure (static fields
    included) and the same shape and dtype at every leaf."""
    leaves, treedef = jax.tree.flatten(item)
    return treedef, tuple((tuple(x.shape), jnp.result_type(x)) for x in leaves)


def buckets(items: Sequence[Any]) -> list[list[int]]:
    """Indices of the non-`None` items grouped by signature, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        if item is not None:
            groups.setdefault(signature(item), []).append(i)
    return list(groups.values())


def bucketed_map(fn: Callable, items: Sequence[Any], enabled: bool = True) -> list[Any]:
    """`[None if a is None else fn(*a) for a in items]`, with identical items batched.

    **Arguments:**

    - `fn`: applied to the unpacked tuple of each item.
    - `items`: tuples of arguments (pytrees), or `None` (the output is `None` too).
    - `enabled`: `False` calls `fn` once per item (no stacking).

    **Returns:** the list of outputs, in the order of `items`.
    """
    groups = Groups(items, enabled)
    return groups.unstack(groups.map(lambda args: fn(*args), groups.stack(items)))


class Groups:
    """Leaves grouped once per step, so every stage of the step runs once per group.

    `stack` turns per-leaf values into per-group values (a group of one keeps its value
    as is; a larger group stacks its members' pytrees along a new leading axis), `map`
    runs a per-leaf function on every group (directly, or under `vmap` for a stack), and
    `unstack` returns to per-leaf values. Stacking the inputs once at the start of the
    step and unstacking the outputs once at the end puts O(groups) ops into the graph for
    the whole step (momentum, fit, apply, clip), plus one slice per leaf and field.

    **Arguments:**

    - `items`: one pytree per leaf (or `None`: such a leaf is in no group); leaves with
        equal [`signature`][] share a group.
    - `enabled`: `False` puts every item into a group of its own (no stacking).
    """

    def __init__(self, items: Sequence[Any], enabled: bool = True):
        self.n = len(items)
        groups = buckets(items)
        if not enabled:
            groups = [[i] for g in groups for i in g]
        self.index: list[list[int]] = groups
        self.pads: list[int] = [0] * len(groups)  # inert rows in a stack (owner-computes)
        self.slots: list[tuple[int, ...]] = [tuple(range(len(g))) for g in groups]
        self.owner: tuple[str, ...] | None = None  # owner-computes axes, see `map_owned`
        self._ids: tuple | None = None  # see `index_at_runtime`

    @classmethod
    def from_index(cls, n: int, index, pads=None, slots=None, owner=None) -> "Groups":
        """Groups of `n` leaves with the given members (a layout stored in the state),
        `pads[g]` inert rows in group `g`'s stacks (`None`: none), its members at rows
        `slots[g]` (`None` or `()`: in order, the padding after them), stacks sharded
        over the mesh axes `owner` (owner-computes; `None`: not)."""
        self = cls.__new__(cls)
        self.n, self.index, self._ids = n, [list(idx) for idx in index], None
        self.owner = owner
        self.pads = list(pads) if pads else [0] * len(self.index)
        slots = list(slots) if slots else [()] * len(self.index)
        self.slots = [tuple(s) if s else tuple(range(len(idx)))
                      for s, idx in zip(slots, self.index)]
        return self

    def padded_to(self, size: int, costs=None) -> "Groups":
        """A copy whose stacks (groups of two or more) are padded to a multiple of
        `size` rows (owner-computes sharding: every device owns as many rows), with the
        members packed across groups by `costs` (one member's estimated work per group;
        `None`: equal) so that every device gets a similar share (`_packing.pack`)."""
        lengths = [len(idx) for idx in self.index]
        pads, slots = pack(lengths, costs or [1] * len(lengths), size)
        return Groups.from_index(self.n, self.index, pads, slots)

    def size(self, g: int) -> int:
        """The rows of group `g`'s stacks: its members and its padding."""
        return len(self.index[g]) + self.pads[g]

    def trailing(self) -> bool:
        """Whether every group keeps its members in order, padding (if any) after."""
        return all(s == tuple(range(len(s))) for s in self.slots)

    def stacked(self, g: int) -> bool:
        """Whether group `g` holds a stack (more than one leaf)."""
        return len(self.index[g]) > 1

    def stack(self, values: Sequence[Any], pad_with: str = "zeros") -> list[Any]:
        """Per-leaf values (pytrees with equal structure within a group) → per group.
        Padding rows (see `pads`) are zeros, or copies of the first member with
        `pad_with="first"`."""
        out = []
        for g, idx in enumerate(self.index):
            if self.stacked(g):
                first = values[idx[0]]
                fill = first if pad_with == "first" else jax.tree.map(jnp.zeros_like, first)
                rows = [fill] * self.size(g)
                for j, i in enumerate(idx):
                    rows[self.slots[g][j]] = values[i]
                out.append(jax.tree.map(lambda *xs: jnp.stack(xs), *rows))
            else:
                out.append(values[idx[0]])
        return out

    def unstack(self, values: Sequence[Any], fill: Any = None,
                only: Sequence[int] | None = None) -> list[Any]:
        """Per-group values → per leaf (`fill` where a leaf is in no group, or not in
        `only` when that is given)."""
        out: list[Any] = [fill] * self.n
        wanted = None if only is None else set(only)
        for g, idx in enumerate(self.index):
            if wanted is not None and not wanted.intersection(idx):
                continue
            if self.stacked(g):
                for j, i in enumerate(idx):
                    if wanted is None or i in wanted:
                        row = self.slots[g][j]
                        out[i] = jax.tree.map(lambda r, k=row: self._row(r, k), values[g])
            else:
                out[idx[0]] = values[g]
        return out

    def index_at_runtime(self, anchor: Int[Array, ""]) -> "Groups":
        """Make `unstack` slice with positions XLA cannot fold into constants.

        A static slice `stack[j]` compiles into its own kernel for every `j`, fused with
        whatever elementwise chain made the stack: XLA's CPU compile time then grows with
        the number of leaves (≈ 15 ms per slice measured, 2-core CPU). With the
        positions coming out of one `lax.cond` on a runtime value (`anchor >= 0`, true
        for a step count), every member's slice is the same `dynamic_slice` kernel on a
        different operand, which XLA compiles once per shape (≈ 1.5 ms per slice).

        **Returns:** a copy of these groups whose `unstack` slices that way.
        """
        out = Groups.from_index(self.n, self.index, self.pads, self.slots, self.owner)
        n = max((self.size(g) for g in range(len(self.index))), default=0)
        if n > 1:
            consts = tuple(jnp.int32(j) for j in range(n))
            out._ids = jax.lax.cond(anchor >= 0, lambda: consts,
                                    lambda: (jnp.int32(0),) * n)
        return out

    def rows(self, r: Array, start: int, n: int) -> Array:
        """`r[start:start + n]`, sliced at a runtime position when `index_at_runtime`
        was called (one kernel per slice shape, as for `unstack`)."""
        if self._ids is None:
            return r[start:start + n]
        return jax.lax.dynamic_slice_in_dim(r, self._ids[0] + start, n)

    def _row(self, r: Array, j: int) -> Array:
        if self._ids is None:
            return r[j]
        return jax.lax.dynamic_index_in_dim(r, self._ids[j], keepdims=False)

    def device_rows(self, g: int, n: int) -> list[int]:
        """Per device of `n` owners, how many members of group `g` it holds."""
        return device_rows(self.size(g), self.slots[g], n)

    def map(self, fn: Callable, *per_group: Sequence[Any],
            skip: Sequence[int] = ()) -> list[Any]:
        """`fn(*args)` of one leaf, on every group (vmapped over a stack); `None` for the
        groups in `skip` (computed elsewhere, e.g. by `map_owned`)."""
        out = []
        for g in range(len(self.index)):
            if g in skip:
                out.append(None)
                continue
            args = tuple(a[g] for a in per_group)
            out.append(jax.vmap(fn)(*args) if self.stacked(g) else fn(*args))
        return out

    def owned(self) -> list[int]:
        """The owner-computes stacks that hold padding: the groups `map_owned` runs."""
        if self.owner is None:
            return []
        return [g for g in range(len(self.index)) if self.stacked(g) and self.pads[g]]

    def map_owned(self, fn: Callable, padding: Callable, *per_group: Sequence[Any]
                  ) -> dict[int, Any]:
        """`fn(*args)` of one leaf on the groups of `owned()`, in one device-dependent
        program that runs each device's real rows only (`_owned.owned_map`); a padding row
        gives `padding(*args)` instead (same output structure, next to no work).

        **Returns:** `{group: its stacked outputs}`.
        """
        owned = self.owned()
        if not owned:
            return {}
        n = owner_size(self.owner)
        results = owned_map(fn, padding, [tuple(a[g] for a in per_group) for g in owned],
                            [self.device_rows(g, n) for g in owned], self.owner)
        return dict(zip(owned, results))

    def indices(self) -> list[Any]:
        """Each group's leaf indices as an int32 array (a stack) or a Python int."""
        out: list[Any] = []
        for g, idx in enumerate(self.index):
            if not self.stacked(g):
                out.append(idx[0])
                continue
            rows = [idx[0]] * self.size(g)  # padding rows: the first member's index
            for j, i in enumerate(idx):
                rows[self.slots[g][j]] = i
            out.append(jnp.asarray(rows, jnp.int32))
        return out
