"""The optimizer around Q: `PSGDState` and the generic `scale_by_psgd` core.

`init` builds the preconditioners (`_build.py`); `update` checks its inputs
(`_validate.py`) and runs one step, all on device with no host sync (`_step.py`, which
lists the parts). Called outside a trace, `update` runs a cached compiled step
(`_eager.py`).
"""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from . import _global
from ._accum import init_fit_accum
from ._adaptive import AdaptiveRefits, init_staleness
from ._bucket import Groups
from ._build import as_leaf_array, build_preconds
from ._diagnostics import init_tracked
from ._eager import eager_cached
from ._global import GLOBAL as GLOBAL, GlobalSlot
from ._layout import LeafBuckets, as_layout, leaf_index, owner_axes, owner_size
from ._mesh import run_auto
from ._misc import as_key, concrete
from ._momentum import init_momentum
from ._norms import Normaliser
from ._options import TRANSFORM, Options, takes
from ._packing import member_cost
from ._precond.base import AbstractPrecond
from ._schedules import as_schedule
from ._step import step
from ._validate import check_update_inputs


class PSGDState(eqx.Module):
    """The state of a PSGD optimizer: an `eqx.Module`, so it serialises with
    `eqx.tree_serialise_leaves` and holds no Python objects.

    **Fields:**

    - `count`: number of `update` calls so far (int32).
    - `key`: the PRNG key for probes, norm bounds and the refit draw.
    - `mu`: the momentum buffer (a pytree like the params), or `None` when `b1 = 0`.
    - `precond`: the preconditioners, stored per bucket of identical leaves (a
        [`psgd_eqx.LeafBuckets`][]; see `preconditioners()` for the per-leaf view). Per
        leaf it is a preconditioner module ([`psgd_eqx.KronQ`][], [`psgd_eqx.DiagQ`][],
        ...), `None` (no preconditioner for that leaf), or an empty marker for a leaf of
        the global group.
    - `refit_accumulator`: the deterministic schedule's accumulated refit probability
        (a refit fires when it reaches 1, so the refit rate equals the probability).
    - `refits`: number of refits done so far (int32), handy for logging.
    - `global_precond`: the one preconditioner over the concatenation of every leaf that
        `structure` mapped to [`psgd_eqx.GLOBAL`][] (`None` if there is none).
    - `fit_accum`: with `precond_grad_accum`, the running sum of the fit inputs since the
        last refit and their number (else `None`).
    - `diagnostics`: with `track_diagnostics=True`, per leaf (a tree like the params) the
        last `update`'s RMS of P·m before clipping, whether it was clipped and the fit
        residual (see [`psgd_eqx.diagnostics`][]); else `None`.
    - `staleness`: with [`psgd_eqx.adaptive_refit_schedule`][], `(1 − βᵗ, EMAs)`: per
        bucket of leaves (and the global group) and axis, the EMA of each leaf's fit
        energies that sets the refit rate, and its bias correction; else `None`.
    - `normaliser`: the (static) step-size normaliser configuration fixed at `init`.
    """

    count: Int[Array, ""]
    key: PRNGKeyArray
    mu: PyTree | None
    precond: LeafBuckets | PyTree
    refit_accumulator: Float[Array, ""]
    refits: Int[Array, ""]
    global_precond: AbstractPrecond | Array | None = None
    fit_accum: tuple[PyTree, Int[Array, ""]] | None = None
    diagnostics: PyTree | None = None
    staleness: tuple | None = None
    normaliser: Normaliser = eqx.field(static=True, default=Normaliser())

    @property
    def global_mask(self) -> tuple[bool, ...]:
        """Per leaf, in flattening order, whether it is in the global group."""
        return tuple(_global.is_slot(x) for x in self._layout().shapes())

    def _layout(self) -> LeafBuckets:
        return as_layout(self.precond, jax.tree.structure(self.precond))

    def preconditioners(self) -> PyTree:
        """Every leaf's preconditioner, as a pytree like the params.

        **Returns:** the params' tree with, per leaf, its preconditioner module (sliced
        out of its bucket's stack), `None`, or the marker of a leaf in the global group.
        """
        return self._layout().tree()

    def preconditioner(self, path) -> AbstractPrecond | GlobalSlot | None:
        """The preconditioner of one parameter.

        **Arguments:**

        - `path`: the parameter's key path (as from `jax.tree_util.tree_flatten_with_path`)
            or its `jax.tree_util.keystr`, e.g. `"['layers'][0]['w']"`.

        **Returns:** its preconditioner module, `None` (no preconditioner), or the marker
        of a leaf in the global group. Raises `KeyError` listing the paths if there is
        no parameter at `path`.
        """
        layout = self._layout()
        return layout.leaves()[leaf_index(layout.treedef, path)]


def _normaliser(o: Options) -> Normaliser:
    # β_L rounded through f32, so a plain and an inject_hyperparams optimizer (which casts
    # it to an f32 array) build identical static state.
    beta = float(np.float32(concrete(o.lipschitz_beta)))
    return Normaliser(beta, o.norm_bound, int(concrete(o.norm_bound_k)),
                      int(concrete(o.norm_bound_iters)))


def _check(o: Options) -> None:
    if not o.whiten_grad and concrete(o.b1) == 0:
        raise ValueError("`whiten_grad=False` (fit on the momentum) needs `b1 > 0`; got b1=0.")
    if o.update_clip_style == "global_norm" and o.update_global_norm_clip is None:
        raise ValueError("`update_clip_style='global_norm'` needs its bound "
                         "`update_global_norm_clip` (a number > 0); got None.")
    if isinstance(o.preconditioner_update_probability, AdaptiveRefits) and o.bernoulli_refit:
        raise ValueError("`adaptive_refit_schedule` sets a refit rate for the deterministic "
                         "accumulator; use it with `bernoulli_refit=False`.")
    _normaliser(o)  # validates the combination


def _bucketed(params: PyTree, precond: PyTree, o: Options) -> LeafBuckets | PyTree:
    """The preconditioners stored per bucket: leaves whose preconditioner and parameter
    have identical structure, shapes and dtypes share one (an int or bool parameter,
    which is not trained, is in none)."""
    p_leaves, treedef = jax.tree.flatten(params)
    if not p_leaves:  # see `_layout.as_layout`
        return precond
    q_leaves = treedef.flatten_up_to(precond)
    items = [(q, p) if jnp.issubdtype(p.dtype, jnp.inexact) else None
             for q, p in zip(q_leaves, p_leaves)]
    groups = Groups(items, enabled=o.bucket_leaves is not False)
    owner = owner_axes(o.owner_axes)
    if owner is not None:
        # the members of all buckets packed across the owners by their estimated work
        groups = groups.padded_to(owner_size(owner),
                                  [member_cost(q_leaves[idx[0]]) for idx in groups.index])
    return LeafBuckets.build(q_leaves, groups, treedef, owner)


_STRUCTURE = (
    inspect.Parameter("structure", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("global_structure", inspect.Parameter.KEYWORD_ONLY, default=None),
)


@takes(TRANSFORM, leading=_STRUCTURE)
@eager_cached
def scale_by_psgd(o: Options) -> optax.GradientTransformationExtraArgs:
    """The generic PSGD transformation: any preconditioner structure per leaf.

    **Arguments:**

    - `structure`: called once per parameter leaf as `structure(path, leaf)` at `init`;
        returns the leaf's initial preconditioner (e.g. `KronQ.init(leaf.shape)`), `None`
        for plain momentum (P = I) on that leaf, or [`psgd_eqx.GLOBAL`][] to put the leaf
        into the global group. It is called only for non-empty floating or complex
        leaves: empty, integer and boolean leaves get `None` (no preconditioner, a zero
        update), and a Python scalar counts as a 0-d array. The preconditioner it returns
        must have the leaf's shape (checked at `init`, naming the path).
    - `global_structure`: `global_structure(n, dtype)` builds the one preconditioner over
        the flattened concatenation (n elements, in flattening order) of the global group,
        e.g. `lambda n, dtype: LRAQ.init(n, dtype)`. Needed iff a leaf is `GLOBAL`.
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`. Its `update` accepts
    `update(updates, state, params=None, *, Hvp=None, vector=None,
    update_preconditioner=None, **extra_args)`: with `Hvp` and `vector` the fit is
    Newton-type on the pair (vector, Hvp) instead of whitening; `update_preconditioner`
    (a bool scalar) overrides the refit schedule. `update` first checks its inputs: a
    tree that differs from the params' raises `ValueError` naming the first differing
    path, a wrong leaf shape names the path and both shapes, and a non-floating gradient
    of a preconditioned leaf raises `TypeError`. Called outside `jit`, it runs a compiled
    step cached per configuration and input shapes.
    """
    _check(o)
    adaptive = isinstance(o.preconditioner_update_probability, AdaptiveRefits)
    # an adaptive schedule's rate is set in the step, from the fit residuals
    probability = None if adaptive else as_schedule(o.preconditioner_update_probability,
                                                    "preconditioner_update_probability")
    precond_lr = as_schedule(o.preconditioner_lr, "preconditioner_lr")

    def init_fn(params):
        params = jax.tree.map(as_leaf_array, params)  # a Python float is a 0-d leaf
        precond, gq = build_preconds(o.structure, o.global_structure, params,
                                      o.preconditioner_init_scale)
        mu = init_momentum(params, o.b1, o.mu_dtype)
        fit_accum = init_fit_accum(params) if o.precond_grad_accum else None
        # separate buffers per field, so a jitted step can donate the whole state
        zero = jnp.zeros([], jnp.int32)
        tracked = init_tracked(params, precond) if o.track_diagnostics else None
        layout = _bucketed(params, precond, o)
        staleness = None
        if adaptive:
            if isinstance(layout, LeafBuckets):
                staleness = init_staleness(layout.groups, list(layout.stacks), gq)
            else:
                staleness = init_staleness(Groups([]), [], gq)
        return PSGDState(zero, as_key(o.key), mu, layout,
                         jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32), gq,
                         fit_accum, tracked, staleness, _normaliser(o))

    def update_fn(updates, state, params=None, *, Hvp=None, vector=None,
                  update_preconditioner=None, **extra_args):
        del params, extra_args
        check_update_inputs(updates, state, Hvp, vector)
        updates, Hvp, vector = jax.tree.map(as_leaf_array, (updates, Hvp, vector))

        def run(updates, state, Hvp, vector, update_preconditioner):
            return step(o, probability, precond_lr, updates, state, Hvp, vector,
                        update_preconditioner)

        # under a mesh with explicit axes: run with them auto, outputs placed as inputs
        return run_auto(run, (updates, state, Hvp, vector, update_preconditioner),
                        out_like=(updates, state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
