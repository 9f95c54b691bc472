"""Building the preconditioners at `init`: one `structure(path, leaf)` call per leaf.

Which leaves get a preconditioner (the one rule, shared with `kron_plan`):

- a leaf gets one only if it is a non-empty floating or complex array: `structure` is not
  called for an empty (size-0) leaf or for an integer or boolean one, which get `None`
  (no preconditioner, no fit), as does a leaf for which `structure` returns `None`;
- a Python scalar among the params (`1.5`) counts as the 0-d array `jnp.asarray(1.5)`,
  as `optax.adam` treats it, so `structure` always receives an array.

Every check of what `structure` returns lives here, so a bad structure fails at `init`
naming the parameter path, not at the first `update`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from . import _global
from ._global import GLOBAL, GlobalSlot
from ._numerics import promote
from ._precond.base import AbstractPrecond


def as_leaf_array(leaf):
    """A parameter leaf as an array: Python scalars (and NumPy values) become 0-d or n-d
    arrays; arrays, tracers and `jax.ShapeDtypeStruct`s are returned unchanged.

    **Arguments:**

    - `leaf`: one leaf of the params.

    **Returns:** something with `shape` and `dtype`.
    """
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return leaf
    return jnp.asarray(leaf)


def gets_precond(leaf) -> bool:
    """Whether a parameter leaf may get a preconditioner (see the module docstring): a
    non-empty floating or complex array.

    **Arguments:**

    - `leaf`: one leaf of the params (as `as_leaf_array` gives it).

    **Returns:** `True` if `structure` is called for it.
    """
    return int(np.prod(leaf.shape)) > 0 and jnp.issubdtype(leaf.dtype, jnp.inexact)


def _checked(q, path, leaf, init_scale):
    """What `structure` returned for one leaf, validated; a `GlobalSlot` for `GLOBAL`."""
    where = jax.tree_util.keystr(path)
    if isinstance(q, str) and q == GLOBAL:
        return GlobalSlot()
    if q is None:
        return None
    if not isinstance(q, AbstractPrecond):
        raise ValueError(
            f"`structure` returned {q!r} for {where}; expected an AbstractPrecond, None or "
            f"psgd_eqx.GLOBAL ({GLOBAL!r})."
        )
    if tuple(q.shape) != tuple(leaf.shape):
        raise ValueError(
            f"`structure` returned a {type(q).__name__} of shape {tuple(q.shape)} for "
            f"{where}, whose leaf has shape {tuple(leaf.shape)}; a preconditioner must have "
            "its leaf's shape."
        )
    return q if init_scale is None else q.rescale(init_scale)


def build_preconds(structure, global_structure, params, init_scale):
    """Call `structure` per leaf; returns `(precond tree, global preconditioner)`.

    **Arguments:**

    - `structure`, `global_structure`: see [`psgd_eqx.scale_by_psgd`][].
    - `params`: the params given to `init`.
    - `init_scale`: a fixed initial scale of every preconditioner, or `None`.

    **Returns:** the tree of preconditioners (the params' structure; `None` or a
    `GlobalSlot` where a leaf has no own preconditioner) and the global group's one.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [as_leaf_array(p) for _, p in flat]
    preconds = [
        _checked(structure(path, p), path, p, init_scale) if gets_precond(p) else None
        for (path, _), p in zip(flat, leaves)
    ]
    glob = [p for p, q in zip(leaves, preconds) if _global.is_slot(q)]
    gq = None
    if glob:
        if global_structure is None:
            raise ValueError(
                "`structure` put leaves into the GLOBAL group but `global_structure` is None."
            )
        n = sum(int(np.prod(p.shape)) for p in glob)
        gq = global_structure(n, promote(*(p.dtype for p in glob)))
        if not isinstance(gq, AbstractPrecond) or tuple(gq.shape) != (n,):
            raise ValueError(
                f"`global_structure({n}, ...)` must return an AbstractPrecond of shape "
                f"({n},) (the concatenated global group); got {_describe(gq)}."
            )
        gq = gq if init_scale is None else gq.rescale(init_scale)
    elif global_structure is not None and not flat:
        # No leaves at all (e.g. `optax.tree_map_params`' placeholder): a leaf here matches
        # whatever global preconditioner the real state has.
        gq = jnp.zeros((0,), jnp.float32)
    return jax.tree_util.tree_unflatten(treedef, preconds), gq


def _describe(q) -> str:
    if isinstance(q, AbstractPrecond):
        return f"a {type(q).__name__} of shape {tuple(q.shape)}"
    return repr(q)
