"""The optimizer around Q: `PSGDState` and the generic `scale_by_psgd` core.

One step, all on device (no host sync), each part in the file named after it:

1. momentum (`_momentum.py`);
2. the refit decision (`_refit.py`), never on non-finite input; the fit inputs averaged
   since the last refit with `precond_grad_accum` (`_accum.py`);
3. at step 0, the data-driven init scale (`_init_scale.py`);
4. one `lax.cond` around *all* refits of the step (`_fit.py`), before or after the apply;
5. precondition and clip (`_apply.py`); leaves of the global group share one
   preconditioner over their concatenation (`_global.py`).
"""

import inspect
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from . import _global
from ._accum import accumulate, init_fit_accum, restart_after_refit
from ._apply import precondition
from ._build import build_preconds
from ._eager import eager_cached
from ._fit import FitSettings, maybe_refit, refit_all
from ._global import GLOBAL as GLOBAL, GlobalSlot
from ._init_scale import rescale_at_first_step
from ._misc import as_key, concrete
from ._momentum import init_momentum, update_momentum
from ._norms import Normaliser
from ._numerics import tree_all_finite
from ._options import TRANSFORM, Options, takes
from ._precond.base import AbstractPrecond
from ._refit import refit_decision
from ._schedules import as_schedule
from ._validate import check_update_inputs


class PSGDState(eqx.Module):
    """The state of a PSGD optimizer: an `eqx.Module`, so it serialises with
    `eqx.tree_serialise_leaves` and holds no Python objects.

    **Fields:**

    - `count`: number of `update` calls so far (int32).
    - `key`: the PRNG key for probes, norm bounds and the refit draw.
    - `mu`: the momentum buffer (a pytree like the params), or `None` when `b1 = 0`.
    - `precond`: a pytree with the params' structure whose leaves are the preconditioner
        modules ([`psgd_eqx.KronQ`][], [`psgd_eqx.DiagQ`][], ...), `None` (no
        preconditioner for that leaf), or an empty marker for a leaf of the global group.
    - `refit_accumulator`: the deterministic schedule's accumulated refit probability
        (a refit fires when it reaches 1, so the refit rate equals the probability).
    - `refits`: number of refits done so far (int32), handy for logging.
    - `global_precond`: the one preconditioner over the concatenation of every leaf that
        `structure` mapped to [`psgd_eqx.GLOBAL`][] (`None` if there is none).
    - `fit_accum`: with `precond_grad_accum`, the running sum of the fit inputs since the
        last refit and their number (else `None`).
    - `normaliser`: the (static) step-size normaliser configuration fixed at `init`.
    """

    count: Int[Array, ""]
    key: PRNGKeyArray
    mu: PyTree | None
    precond: PyTree
    refit_accumulator: Float[Array, ""]
    refits: Int[Array, ""]
    global_precond: AbstractPrecond | Array | None = None
    fit_accum: tuple[PyTree, Int[Array, ""]] | None = None
    normaliser: Normaliser = eqx.field(static=True, default=Normaliser())

    @property
    def global_mask(self) -> tuple[bool, ...]:
        """Per leaf, in flattening order, whether it is in the global group."""
        def entry(x):  # one per parameter leaf: a preconditioner, None or a slot
            return x is None or isinstance(x, (AbstractPrecond, GlobalSlot))

        return tuple(_global.is_slot(x) for x in jax.tree.leaves(self.precond, is_leaf=entry))


def _normaliser(o: Options) -> Normaliser:
    # β_L rounded through f32, so a plain and an inject_hyperparams optimizer (which casts
    # it to an f32 array) build identical static state.
    beta = float(np.float32(concrete(o.lipschitz_beta)))
    return Normaliser(beta, o.norm_bound, int(concrete(o.norm_bound_k)),
                      int(concrete(o.norm_bound_iters)))


def _check(o: Options) -> None:
    if not o.whiten_grad and concrete(o.b1) == 0:
        raise ValueError("`whiten_grad=False` (fit on the momentum) needs `b1 > 0`; got b1=0.")
    _normaliser(o)  # validates the combination


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
        into the global group. Empty (size-0) leaves are not passed and get `None`.
    - `global_structure`: `global_structure(n, dtype)` builds the one preconditioner over
        the flattened concatenation (n elements, in flattening order) of the global group,
        e.g. `lambda n, dtype: LRAQ.init(n, dtype)`. Needed iff a leaf is `GLOBAL`.
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`. Its `update` accepts
    `update(updates, state, params=None, *, Hvp=None, vector=None,
    update_preconditioner=None, **extra_args)`: with `Hvp` and `vector` the fit is
    Newton-type on the pair (vector, Hvp) instead of whitening; `update_preconditioner`
    (a bool scalar) overrides the refit schedule.
    """
    _check(o)
    probability = as_schedule(o.preconditioner_update_probability,
                              "preconditioner_update_probability")
    precond_lr = as_schedule(o.preconditioner_lr, "preconditioner_lr")

    def init_fn(params):
        precond, gq = build_preconds(o.structure, o.global_structure, params,
                                      o.preconditioner_init_scale)
        fit_accum = init_fit_accum(params) if o.precond_grad_accum else None
        # separate buffers per field, so a jitted step can donate the whole state
        zero = jnp.zeros([], jnp.int32)
        return PSGDState(zero, as_key(o.key), init_momentum(params, o.b1, o.mu_dtype),
                         precond, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32), gq,
                         fit_accum, _normaliser(o))

    def update_fn(updates, state, params=None, *, Hvp=None, vector=None,
                  update_preconditioner=None, **extra_args):
        del params, extra_args
        check_update_inputs(updates, state, Hvp, vector)
        return _step(o, probability, precond_lr, updates, state, Hvp, vector,
                     update_preconditioner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _step(
    o: Options,
    probability: Callable,
    precond_lr: Callable,
    grads: PyTree,
    state: PSGDState,
    hvp: PyTree | None,
    vector: PyTree | None,
    override: bool | Bool[ArrayLike, ""] | None,
) -> tuple[PyTree, PSGDState]:
    """One `update` of `scale_by_psgd` (see the module docstring for the parts)."""
    newton = hvp is not None
    g_leaves, treedef = jax.tree.flatten(grads)
    slots = treedef.flatten_up_to(state.precond)
    members = _global.members(slots)
    qs = [None if _global.is_slot(q) else q for q in slots]
    gq = state.global_precond if members else None
    count, finite = state.count, tree_all_finite(grads)
    key, k_refit, k_draw, k_round = jax.random.split(state.key, 4)

    mu, m_hat = None, g_leaves
    if state.mu is not None:
        mu_leaves, m_hat = update_momentum(
            treedef.flatten_up_to(state.mu), g_leaves, count, finite, k_round, b1=o.b1,
            warmup=o.momentum_warmup, stochastic_rounding=o.stochastic_rounding)
        mu = jax.tree.unflatten(treedef, mu_leaves)

    if newton:
        inputs, vectors = treedef.flatten_up_to(hvp), treedef.flatten_up_to(vector)
        fit_ok = finite & tree_all_finite(hvp) & tree_all_finite(vector)
    else:
        inputs, vectors = (g_leaves if o.whiten_grad else m_hat), [None] * len(g_leaves)
        fit_ok = finite
    fit_accum = state.fit_accum
    if fit_accum is not None and not newton:
        sums, n, inputs = accumulate(treedef.flatten_up_to(fit_accum[0]), fit_accum[1],
                                     inputs, finite)
    do_refit, acc = refit_decision(count, state.refit_accumulator, fit_ok, k_draw,
                                   probability=probability, bernoulli=o.bernoulli_refit,
                                   override=override)
    if o.preconditioner_init_scale is None:
        qs, gq = rescale_at_first_step(count, (qs, gq), newton=newton, grads=g_leaves,
                                       vectors=vectors, fit_inputs=inputs, damping=o.damping)

    settings = FitSettings(newton, o.damping, precond_lr(count), state.normaliser,
                           o.balance_probability, o.stochastic_rounding)

    def refit(preconds):
        return refit_all(preconds, k_refit, inputs, vectors, members, settings,
                         o.bucket_leaves is not False)

    # decided when the update is traced, i.e. for the backend it is compiled for
    bucket_apply = o.bucket_leaves is True or (
        o.bucket_leaves == "auto" and jax.default_backend() != "cpu")

    def apply(preconds):
        return precondition(preconds, m_hat, members, o.grad_clip_max_amp,
                            o.grad_clip_max_element, bucket_apply)

    if o.update_preconditioner_first:
        qs, gq = maybe_refit(do_refit, (qs, gq), refit)
        out = apply((qs, gq))
    else:
        out = apply((qs, gq))
        qs, gq = maybe_refit(do_refit, (qs, gq), refit)

    if fit_accum is not None and not newton:
        sums, n = restart_after_refit(sums, n, do_refit)
        fit_accum = (jax.tree.unflatten(treedef, sums), n)
    slots = [s if _global.is_slot(s) else q for s, q in zip(slots, qs)]
    new_state = PSGDState(
        optax.safe_increment(count), key, mu, jax.tree.unflatten(treedef, slots), acc,
        state.refits + do_refit.astype(jnp.int32), gq if members else state.global_precond,
        fit_accum, state.normaliser,
    )
    return jax.tree.unflatten(treedef, out), new_state
