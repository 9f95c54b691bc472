"""Same-shape bucketing: one batched call per group of identical leaves.

A transformer that is not scanned has tens of leaves with the same shape (every layer's
query, key, value, ... weights), so their preconditioners have identical structure. Calling
`update`/`apply` once per leaf puts one chain of small ops per leaf into the step's XLA
graph; stacking identical items and running the call under one `vmap` puts in one chain
per *bucket*, with the per-leaf arrays stacked on the way in and sliced on the way out.
The state stays per leaf (checkpoints do not depend on the bucketing), and every item
keeps its own PRNG key, so bucketed and per-leaf results agree up to float rounding.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


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
    out: list[Any] = [None] * len(items)
    for idx in buckets(items):
        if len(idx) == 1 or not enabled:
            for i in idx:
                out[i] = fn(*items[i])
            continue
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(items[i] for i in idx))
        res = jax.vmap(lambda args: fn(*args))(stacked)
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda r, j=j: r[j], res)
    return out
