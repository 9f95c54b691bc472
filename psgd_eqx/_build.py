"""Building the preconditioners at `init`: one `structure(path, leaf)` call per leaf.

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


def build_preconds(structure, global_structure, params, init_scale):
    """Call `structure` per leaf; returns `(precond tree, global preconditioner)`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    preconds = []
    for path, p in flat:
        # An empty leaf has nothing to precondition (and no statistics to fit).
        q = structure(path, p) if int(np.prod(p.shape)) > 0 else None
        if isinstance(q, str) and q == GLOBAL:
            q = GlobalSlot()
        elif q is not None and not isinstance(q, AbstractPrecond):
            raise ValueError(
                f"`structure` returned {q!r} for {jax.tree_util.keystr(path)}; expected an "
                f"AbstractPrecond, None or psgd_eqx.GLOBAL ({GLOBAL!r})."
            )
        elif q is not None and init_scale is not None:
            q = q.rescale(init_scale)
        preconds.append(q)
    glob = [p for (_, p), q in zip(flat, preconds) if _global.is_slot(q)]
    gq = None
    if glob:
        if global_structure is None:
            raise ValueError(
                "`structure` put leaves into the GLOBAL group but `global_structure` is None."
            )
        n = sum(int(np.prod(p.shape)) for p in glob)
        gq = global_structure(n, promote(*(p.dtype for p in glob)))
        gq = gq if init_scale is None else gq.rescale(init_scale)
    elif global_structure is not None and not flat:
        # No leaves at all (e.g. `optax.tree_map_params`' placeholder): a leaf here matches
        # whatever global preconditioner the real state has.
        gq = jnp.zeros((0,), jnp.float32)
    return jax.tree_util.tree_unflatten(treedef, preconds), gq
