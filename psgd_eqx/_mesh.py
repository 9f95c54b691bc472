"""The update under a mesh with `Explicit` axes (the default of `jax.make_mesh`).

With explicit sharding every operation must have an unambiguous output sharding, and
`with_sharding_constraint` only asserts. The optimizer's step is written for XLA's SPMD
partitioner instead: state arrays follow the placement rules (`_sharding.py`) and
owner-computes stacks are pinned to their owners, with XLA choosing the communication in
between. So under a mesh with explicit axes the step runs with those axes made `Auto`
(`jax.sharding.auto_axes`), and its outputs are given back with the shardings their
inputs came in with: the updates like the gradients, the new state like the old one.
"""

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AxisType


def explicit_axes() -> tuple[str, ...]:
    """The `Explicit` axes of the mesh in context (none without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return ()
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types)
                 if t == AxisType.Explicit)


def _spec(x):
    return jax.typeof(x).sharding.spec


def run_auto(fn: Callable, args: tuple, out_like: Any) -> Any:
    """`fn(*args)`; under a mesh with explicit axes, run with those axes auto.

    **Arguments:**

    - `fn`: the function.
    - `args`: its arguments.
    - `out_like`: a tree with the structure of `fn`'s output whose arrays carry the
        shardings the outputs should have (e.g. the inputs they replace).

    **Returns:** `fn(*args)`.
    """
    axes = explicit_axes()
    if not axes:
        return fn(*args)
    out = jax.tree.map(_spec, out_like)
    return jax.sharding.auto_axes(lambda *a: fn(*a), axes=axes, out_sharding=out)(*args)


def take_row(x, j: int):
    """`x[j]`, also when `x`'s first axis is sharded over `Explicit` mesh axes (an
    owner-computes stack read outside the step, e.g. by `PSGDState.preconditioners`):
    there the row keeps the sharding of the other axes."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    mesh = getattr(sharding, "mesh", None)
    if spec is None or not len(spec) or spec[0] is None or mesh is None or not any(
            t == AxisType.Explicit for t in mesh.axis_types):
        return x[j]
    row = jax.sharding.PartitionSpec(*tuple(spec)[1:])
    return x.at[j].get(out_sharding=jax.sharding.NamedSharding(mesh, row))
