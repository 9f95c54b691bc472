"""Checks of what `update` is given, before anything is traced: a mismatch is reported
with the parameter path it concerns.

The state records the params' tree three ways: `precond` (stored per bucket; its per-leaf
view has one entry per leaf: a preconditioner, a `GlobalSlot` or `None`), the momentum
`mu` and the fit accumulator (arrays like the params, when kept). The gradients (and the
Newton pair) must have that tree: on a mismatch the first differing path is named, with
what each side has there; then every leaf must have its parameter's shape, a leaf with a
preconditioner a floating dtype, and the leaves of one bucket one dtype (their inputs
are stacked). A `None` gradient is accepted only where the params had `None` (as `optax.adam`,
which rejects it elsewhere): filter the params given to `init` instead, e.g. with
`eqx.filter(model, eqx.is_inexact_array)`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._global import GlobalSlot
from ._layout import as_layout
from ._precond.base import AbstractPrecond


_STATE = "the optimizer state (from the params given to `init`)"


def _is_leaf(x) -> bool:
    """A pytree leaf (an array, a scalar, ...): not `None`, not a container."""
    td = jax.tree.structure(x)
    return x is not None and td.num_nodes == 1 and td.num_leaves == 1


def _where(path) -> str:
    return jax.tree_util.keystr(path) if path else "the top level"


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return repr(getattr(k, attr))
    return str(k)


def _children(x):
    """`x` one level deep: its node's treedef and `[(key, child)]`."""
    flat, td = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    return td, [(p[0], c) for p, c in flat]


def _describe(x) -> str:
    """What one side has at a path, in words."""
    if x is None:
        return "None"
    if isinstance(x, AbstractPrecond):
        return f"a leaf (with a {type(x).__name__} of shape {tuple(x.shape)})"
    if isinstance(x, GlobalSlot):
        return "a leaf (of the global group)"
    if _is_leaf(x):
        shape = getattr(x, "shape", None)
        return f"a leaf of shape {tuple(shape)}" if shape is not None else f"a leaf {x!r}"
    _, kids = _children(x)
    keys = [_key(k) for k, _ in kids]
    if isinstance(x, dict):
        return f"a {type(x).__name__} with keys [{', '.join(keys)}]"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of length {len(kids)}"
    return f"a {type(x).__name__} with children [{', '.join(keys)}]"


def _first_difference(name: str, g, s, path, expect) -> str | None:
    """The message for the first path (in flattening order) where `g` (the user's tree)
    and `s` (a tree of the state) differ, or `None`.

    `expect(s)` says what `g` must be where `s` is: `"leaf"`, `"leaf or None"`, `"None"`,
    or `None` when `s` is a container to compare child by child.
    """
    want = expect(s)
    where = _where(path)
    mismatch = f"{name} has {_describe(g)} at {where} where {_STATE} has {_describe(s)}."
    if want is not None:
        ok = (g is None and "None" in want) or (_is_leaf(g) and "leaf" in want)
        if g is None and not ok:
            mismatch += (" A `None` gradient is accepted only where the params had `None`: "
                         "give `init` the params filtered the same way, e.g. "
                         "`eqx.filter(model, eqx.is_inexact_array)`.")
        return None if ok else mismatch
    if g is None or _is_leaf(g):
        return mismatch
    g_def, g_kids = _children(g)
    s_def, s_kids = _children(s)
    if g_def != s_def:
        if isinstance(g, dict) and isinstance(s, dict) and type(g) is type(s):
            s_keys = sorted(s, key=str)
            extra = [k for k in sorted(g, key=str) if k not in s]
            if extra:
                return f"{name} has key {extra[0]!r} at {where} but {_STATE} has keys {s_keys}."
            missing = [k for k in s_keys if k not in g]
            return f"{name} lacks key {missing[0]!r} at {where}; {_STATE} has keys {s_keys}."
        if type(g) is type(s) and len(g_kids) == len(s_kids) and not isinstance(g, tuple):
            return (f"{name} has a {type(g).__name__} at {where} whose static fields differ "
                    f"from those in {_STATE}.")
        return mismatch
    for (k, gc), (_, sc) in zip(g_kids, s_kids):
        found = _first_difference(name, gc, sc, (*path, k), expect)
        if found is not None:
            return found
    return None


def _expect_entry(s):
    if isinstance(s, (AbstractPrecond, GlobalSlot)):
        return "leaf"
    return "leaf or None" if s is None else None


def _expect_array(s):
    if s is None:
        return "None"
    return "leaf" if _is_leaf(s) else None


def _state_trees(state) -> list:
    """(tree, expect) for each params-like tree of the state."""
    # stored per bucket: its per-leaf view, without slicing
    layout = as_layout(state.precond, jax.tree.structure(state.precond))
    trees = [(jax.tree.unflatten(layout.treedef, layout.shapes()), _expect_entry)]
    if state.mu is not None:
        trees.append((state.mu, _expect_array))
    if state.fit_accum is not None:
        trees.append((state.fit_accum[0], _expect_array))
    return trees


def _check_structure(name: str, tree: PyTree, state) -> list[list]:
    """Raise `ValueError` at the first path where `tree` does not have the params' tree;
    returns, per tree of the state, its entries in `tree`'s leaf order."""
    td = jax.tree.structure(tree)
    per_state = []
    for s, expect in _state_trees(state):
        try:
            entries = td.flatten_up_to(s)
        except (ValueError, TypeError):
            entries = None
        # each of the user's leaves must sit where the state has a leaf of its own
        ok = entries is not None and all("leaf" in (expect(e) or "") for e in entries)
        if not ok:
            message = _first_difference(name, tree, s, (), expect)
            # flatten_up_to is stricter than the walk only in ways the walk reports too
            raise ValueError(message or f"{name} does not have the params' tree structure.")
        per_state.append(entries)
    return per_state


def _check_leaves(name: str, tree: PyTree, per_state: list[list]) -> None:
    """Every leaf has its parameter's shape; a leaf with a preconditioner is floating."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    slots = per_state[0]
    like = per_state[1:]  # momentum / accumulator arrays: the params' shapes
    for i, (path, g) in enumerate(flat):
        q = slots[i]
        shape, dtype = np.shape(g), jnp.result_type(g) if not hasattr(g, "dtype") else g.dtype
        if isinstance(q, AbstractPrecond):
            want = tuple(q.shape)
        elif like:
            want = tuple(like[0][i].shape)
        else:
            want = None  # no record of this leaf's shape in the state
        if want is not None and tuple(shape) != want:
            raise ValueError(
                f"{name} at {jax.tree_util.keystr(path)} has shape {tuple(shape)}, but "
                f"{_STATE} expects {want}."
            )
        if isinstance(q, (AbstractPrecond, GlobalSlot)) and not jnp.issubdtype(
            dtype, jnp.inexact
        ):
            raise TypeError(
                f"{name} at {jax.tree_util.keystr(path)} has dtype {jnp.dtype(dtype)}, but "
                "that leaf has a preconditioner, which needs floating or complex gradients."
            )


def _check_global_size(name: str, tree: PyTree, state, slots: list) -> None:
    """The leaves of the global group add up to the global preconditioner's size."""
    gq = state.global_precond
    members = [i for i, q in enumerate(slots) if isinstance(q, GlobalSlot)]
    if not members or not isinstance(gq, AbstractPrecond):
        return
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    n = sum(int(np.prod(np.shape(flat[i][1]))) for i in members)
    if (n,) != tuple(gq.shape):
        paths = ", ".join(jax.tree_util.keystr(flat[i][0]) for i in members)
        raise ValueError(
            f"the leaves of the global group in {name} ({paths}) have {n} elements, but the "
            f"global preconditioner was built for {gq.shape[0]}."
        )


def _check_buckets(name: str, tree: PyTree, state) -> None:
    """The leaves of one bucket share a dtype (their inputs are stacked), and a floating
    one: a bucket holds the trained leaves."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for idx in as_layout(state.precond, jax.tree.structure(state.precond)).index:
        dtypes = [jnp.result_type(flat[i][1]) for i in idx]
        for i, dtype in zip(idx, dtypes):
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise TypeError(
                    f"{name} at {jax.tree_util.keystr(flat[i][0])} has dtype {dtype}, but "
                    "its parameter is floating (trained): give it a floating gradient."
                )
        if any(d != dtypes[0] for d in dtypes):
            where = ", ".join(f"{jax.tree_util.keystr(flat[i][0])} ({d})"
                              for i, d in zip(idx, dtypes))
            raise TypeError(
                f"{name} has different dtypes for parameters of one shape and dtype: "
                f"{where}. Give them one dtype (e.g. the parameters')."
            )


def check_update_inputs(grads: PyTree, state, hvp: PyTree | None,
                        vector: PyTree | None) -> None:
    """Raise a clear error when the inputs of `update` do not fit the state.

    **Arguments:**

    - `grads`: the gradients given to `update`.
    - `state`: the optimizer's `PSGDState`.
    - `hvp`, `vector`: the Newton pair, or `None`.

    **Returns:** nothing; raises `ValueError` naming the first path where a tree differs
    from the params' (and what each side has there) or a leaf's shape differs from its
    parameter's, and `TypeError` for a non-floating gradient of a preconditioned leaf.
    """
    if (hvp is None) != (vector is None):
        raise ValueError("`Hvp` and `vector` must be given together for Newton fitting.")
    for name, tree in (("grads", grads), ("Hvp", hvp), ("vector", vector)):
        if name != "grads" and tree is None:
            continue
        per_state = _check_structure(name, tree, state)
        _check_leaves(name, tree, per_state)
        _check_buckets(name, tree, state)
        _check_global_size(name, tree, state, per_state[0])
