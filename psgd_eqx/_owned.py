"""Owner-computes work that skips the padding: one device-dependent program per step.

Under owner-computes sharding every bucket's stack is sharded along its first axis, so
each device holds `k` rows of it; `_packing.py` decides which of them are real members
(each device's first `c` rows) and which are inert padding, balancing the members of all
buckets across the devices. A `vmap` over the whole stack, split evenly by XLA's SPMD
partitioner, would still run every row: the padding rows cost as much as real ones, and
since every device holds rows of every bucket, the device with the most real work sets
the pace of all of them.

So the expensive part of the step (the refit and the apply of each member, as one
function: `_step._owned_steps`) runs on padded stacks in one `jax.shard_map` over the
owner axes: each device reads its *pattern* (how many real rows it holds of every padded
bucket) from its index on those axes and `lax.switch`es to the program for that pattern,
which runs the per-leaf function on its real rows only and gives the padding rows a cheap
stand-in (`padding`: the unchanged preconditioner and a zero update). A model has few
patterns (two for four buckets of 4 members on 8 devices), so the switch adds a few
branches, compiled once each.

Stacks without padding keep the plain `vmap` (every device's rows are all real there).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def owner_size(axes: tuple[str, ...]) -> int:
    """How many devices share a stack: the product of the `axes` of the mesh in context.

    Raises `ValueError` when no mesh is set or it lacks one of the axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        raise ValueError(
            f"`owner_axes={axes}` needs a mesh: call `init` and `update` under "
            "`with jax.set_mesh(mesh):`."
        )
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"`owner_axes` names {missing}, which the mesh in context "
                         f"(axes {tuple(mesh.shape)}) does not have.")
    return int(math.prod(mesh.shape[a] for a in axes))


def _rows(tree: Any, start: int, stop: int | None) -> Any:
    return jax.tree.map(lambda x: x[start:stop], tree)


def _local_program(fn: Callable, padding: Callable, counts: tuple[int, ...]) -> Callable:
    """The program of a device holding `counts[i]` real rows (its first ones) of stack
    `i`: `fn` on those under `vmap`, `padding` on the rest."""
    def run(local: tuple) -> list:
        out = []
        for c, args in zip(counts, local):
            k = jax.tree.leaves(args)[0].shape[0]
            parts = []
            if c:
                parts.append(jax.vmap(fn)(*_rows(args, 0, c)))
            if c < k:
                parts.append(jax.vmap(padding)(*_rows(args, c, None)))
            out.append(parts[0] if len(parts) == 1 else jax.tree.map(
                lambda *xs: jnp.concatenate(xs), *parts))
        return out

    return run


def owned_map(fn: Callable, padding: Callable, per_stack: Sequence[tuple],
              counts: Sequence[Sequence[int]], owner: tuple[str, ...]) -> list:
    """`vmap(fn)` over padded stacks sharded over `owner`, each device running only its
    real rows.

    **Arguments:**

    - `fn`: the per-leaf function.
    - `padding`: what a padding row gives instead (same output structure, shapes and
        dtypes as `fn`); it should cost next to nothing.
    - `per_stack`: per stack, the tuple of `fn`'s arguments, each stacked along a first
        axis sharded over `owner` (a multiple of the owner count).
    - `counts`: per stack, per device (in the order of the `owner` axes), its number of
        real rows; they are its first rows.
    - `owner`: the mesh axes the stacks are sharded over.

    **Returns:** per stack, `fn`'s outputs stacked (the padding rows' from `padding`),
    sharded like the inputs.
    """
    n = owner_size(owner)
    per_device = [tuple(c[d] for c in counts) for d in range(n)]
    patterns = sorted(set(per_device), reverse=True)
    programs = [_local_program(fn, padding, p) for p in patterns]

    def body(*local):
        if len(programs) == 1:
            return programs[0](local)
        table = jnp.asarray([patterns.index(p) for p in per_device], jnp.int32)
        return jax.lax.switch(table[jax.lax.axis_index(owner)], programs, local)

    spec = P(owner)
    return jax.shard_map(body, in_specs=spec, out_specs=spec, axis_names=set(owner),
                         check_vma=False)(*per_stack)
