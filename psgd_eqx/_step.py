"""One `update` of `scale_by_psgd`, run once per group of identical leaves.

The parts, in order, each in the file named after it:

1. momentum (`_momentum.py`);
2. the refit decision (`_refit.py`), never on non-finite input; the fit inputs averaged
   since the last refit with `precond_grad_accum` (`_accum.py`);
3. at step 0, the data-driven init scale (`_init_scale.py`);
4. one `lax.cond` around *all* refits of the step (`_fit.py`), before or after the apply;
5. precondition and clip (`_apply.py`); leaves of the global group share one
   preconditioner over their concatenation (`_global.py`).

Why groups: a model has many leaves but few distinct shapes (every layer's query weight
looks alike). Leaves whose preconditioner and parameter have identical structure form a
group (`_bucket.Groups`, fixed at `init`); the state stores each group's preconditioners
as one stack (`_layout.py`), the other inputs (gradients, momenta, ...) are stacked once
at the start, every part runs once per group (under `vmap` for a stack), and the outputs
are sliced per leaf once at the end, with slices XLA compiles once per shape
(`Groups.index_at_runtime`). Compile time and per-step dispatch overhead then grow with
the number of groups, not of leaves; every leaf keeps its own keys, so the numbers do not
depend on the grouping (up to float rounding).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, PyTree

from . import _global, _momentum, _rng
from ._accum import accumulate, restart_after_refit
from ._adaptive import AdaptiveRefits, update_staleness
from ._apply import clip, clip_leaf, global_norm_factor
from ._bucket import Groups
from ._diagnostics import Tracked, fit_stats, update_figures
from ._fit import FitSettings, fit_member, refit_groups
from ._init_scale import grad_stats, log_sum_abs2, scale_from_grad_stats, scale_from_hvp_logs
from ._layout import as_layout, pin_stacks, stack_inputs, unstack_outputs
from ._numerics import tree_all_finite
from ._options import Options
from ._precond.stacked import StackedQ
from ._refit import refit_decision


def _has_q(q) -> bool:
    return q is not None and not _global.is_slot(q)


def _map_q(groups: Groups, fn: Callable, qs: list, *args: list) -> list:
    """`fn(q, *args)` on the groups that have a preconditioner; the others keep theirs."""
    out = list(qs)
    for g, q in enumerate(qs):
        if _has_q(q):
            one = tuple(a[g] for a in args)
            out[g] = jax.vmap(fn)(q, *one) if groups.stacked(g) else fn(q, *one)
    return out


def _leaf_grad_stats(q, g: Array):
    # A scanned stack counts as its layers: one statistic per layer, as separate leaves.
    if isinstance(q, StackedQ):
        return jax.vmap(grad_stats)(g)
    return grad_stats(g)


def _first_step_scale(o: Options, groups: Groups, newton: bool, qs: list, grads: list,
                      vectors: list, inputs: list, finite: Bool[Array, ""]):
    """The data-driven init scale from every (non-empty) leaf, one stat per leaf.

    The scale needs only the max (whitening) or the log-sum-exp (Newton) of the per-leaf
    statistics, so each group reduces its own first and only one number per group is
    combined: no per-leaf values are gathered across devices. The zero rows that pad an
    owner-computes stack give −inf and "all zero": neutral in both reductions.
    """
    live = [g for g, x in enumerate(grads) if x.size > 0]  # empty leaves have no stats
    if not live:
        return jnp.ones((), jnp.float32)

    def per_group(fn, reduce, *args):
        return jnp.stack([reduce(jax.vmap(fn)(*(a[g] for a in args))) if groups.stacked(g)
                          else reduce(fn(*(a[g] for a in args))) for g in live])

    if newton:
        lse = jax.scipy.special.logsumexp
        v_logs = per_group(log_sum_abs2, lse, vectors)
        h_logs = per_group(log_sum_abs2, lse, inputs)
        ok = tree_all_finite([vectors[g] for g in live]) & tree_all_finite(
            [inputs[g] for g in live])
        return scale_from_hvp_logs(v_logs, h_logs, ok)
    logs = per_group(lambda q, g: _leaf_grad_stats(q, g)[0], jnp.max, qs, grads)
    nonzero = per_group(lambda q, g: _leaf_grad_stats(q, g)[1], jnp.any, qs, grads)
    return scale_from_grad_stats(logs, nonzero, finite, o.damping)


def _momentum_all(o: Options, groups: Groups, count, finite, key, mu: list, grads: list):
    """Every group's EMA step: `(new buffers, debiased momenta)`, per group."""
    beta, debias, debias_next = _momentum.coefficients(count, o.b1, o.momentum_warmup)

    def one(m, g, i):
        return _momentum.step(m, g, i, beta=beta, debias=debias, finite=finite, key=key,
                              stochastic_rounding=o.stochastic_rounding,
                              debias_next=debias_next if o.nesterov else None)

    new_mu, m_hat = zip(*groups.map(one, mu, grads, groups.indices()))
    return list(new_mu), list(m_hat)


def _global_pair(groups: Groups, members: list[int], inputs: list, vectors: list | None):
    """The global group's concatenated `(fit input, Newton probe or None)`, or `None`."""
    if not members:
        return None
    x = groups.unstack(inputs, only=members)
    v = None if vectors is None else groups.unstack(vectors, only=members)
    return (_global.concat([x[i] for i in members]),
            None if v is None else _global.concat([v[i] for i in members]))


def _apply_member(o: Options) -> Callable:
    """clip(P·m) of one member (`(update, figures)` with `track_diagnostics`; `None` for
    a global-group slot, whose update comes from the global preconditioner)."""
    bounds = (o.grad_clip_max_amp, o.grad_clip_max_element, o.update_clip_style)

    def one(q, m):
        if _global.is_slot(q):
            return None
        pre = m if q is None else q.apply(m)
        u = clip_leaf(q, pre, *bounds)
        return (u, update_figures(q, pre, u)) if o.track_diagnostics else u

    return one


def _apply_all(o: Options, groups: Groups, members: list[int], preconds, m_hat: list,
               owned: dict):
    """clip(P·m): per group (vmapped over a stack; `None` for the global group's
    members; the groups in `owned` already computed by the owner-computes program),
    `{leaf index: update}` of the global group's one preconditioner over its members'
    concatenated momenta, and, with `track_diagnostics`, the same two layouts of
    `(RMS before clipping, clipped)` (else `None`)."""
    qs, gq = preconds
    bounds = (o.grad_clip_max_amp, o.grad_clip_max_element, o.update_clip_style)
    track = o.track_diagnostics
    one = _apply_member(o)

    glob, glob_fig = {}, {}
    if members:
        like = groups.unstack(m_hat, only=members)
        like = [like[i] for i in members]
        flat = gq.apply(_global.concat(like))
        for i, pre in zip(members, _global.split(flat, like)):
            glob[i] = clip(pre, *bounds)
            glob_fig[i] = update_figures(None, pre, glob[i])
    out = groups.map(one, qs, m_hat, skip=list(owned))
    out = [owned.get(g, u) for g, u in enumerate(out)]
    figs = None
    if track:
        figs = [None if x is None else x[1] for x in out]
        out = [None if x is None else x[0] for x in out]
    if o.update_clip_style == "global_norm":
        factor = global_norm_factor([u for u in out if u is not None] + list(glob.values()),
                                    o.update_global_norm_clip)
        out = [None if u is None else u * factor.astype(u.dtype) for u in out]
        glob = {i: u * factor.astype(u.dtype) for i, u in glob.items()}
        if track:  # the clip is the global factor: one flag for every leaf
            figs = [None if f is None else (f[0], jnp.broadcast_to(factor < 1, f[1].shape))
                    for f in figs]
            glob_fig = {i: (f[0], factor < 1) for i, f in glob_fig.items()}
    return out, glob, (figs, glob_fig) if track else None


def _owned_steps(o: Options, groups: Groups, do_refit: Bool[Array, ""], settings: FitSettings,
                 qs: list, keys: list, inputs: list, vectors: list, m_hat: list):
    """The refit (if `do_refit`) and the apply of every owner-computes stack that holds
    padding, as *one* per-member function run by `Groups.map_owned`: each device runs
    the program for the rows it really holds, and padding rows keep their preconditioner
    and give zero updates. One program for both (rather than one per part) makes the
    busiest device's work the most expensive branch of one `switch`, which is also what
    `cost_analysis()` reports; with two switches it would add up two maxima that may come
    from different devices.

    **Returns:** `({group: new preconditioners}, {group: what `_apply_member` gives})`,
    empty without such stacks.
    """
    apply = _apply_member(o)
    fit = functools.partial(fit_member, s=settings)

    def member(q, key, x, v, m):
        def refit(q):
            return jax.lax.cond(do_refit, lambda q: fit(q, key, x, v), lambda q: q, q)

        if o.update_preconditioner_first:
            q = refit(q)
            return q, apply(q, m)
        return refit(q), apply(q, m)

    def padding(q, key, x, v, m):
        out = jax.eval_shape(apply, q, m)
        return q, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)

    results = groups.map_owned(member, padding, qs, keys, inputs, vectors, m_hat)
    return ({g: r[0] for g, r in results.items()}, {g: r[1] for g, r in results.items()})


def _fit_stats(groups: Groups, qs: list, gq, inputs: list, vectors: list, pair) -> list:
    """Every bucket's `(fit ratios, per-axis energies)` (see `_diagnostics.fit_stats`), then
    the global group's if it has one, with the preconditioners this step's refit starts
    from."""
    out = groups.map(fit_stats, qs, inputs, vectors)
    if gq is not None and pair is not None:
        out.append(fit_stats(gq, *pair))
    return out


def _fit_figures(o: Options, groups: Groups, qs: list, gq, inputs: list, vectors: list,
                 pair, staleness, fit_ok: Bool[Array, ""]):
    """With `track_diagnostics` or the adaptive schedule: the fit ratios per bucket (for
    the tracked figures), the new `PSGDState.staleness` and the adaptive refit rate of
    this step (else `None`s and the old staleness), measured with the preconditioners
    this step's refit starts from."""
    schedule = o.preconditioner_update_probability
    adaptive = isinstance(schedule, AdaptiveRefits)
    if not (o.track_diagnostics or adaptive):
        return None, staleness, None
    stats = _fit_stats(groups, qs, gq, inputs, vectors, pair)
    if not adaptive:
        return [r for r, _ in stats], staleness, None
    staleness, stale = update_staleness(schedule, groups, staleness,
                                        [e for _, e in stats], fit_ok)
    return [r for r, _ in stats], staleness, schedule.rate(stale)


def _tracked(groups: Groups, treedef, inert: list[bool], figures, ratios: list,
             old: PyTree, ok: Bool[Array, ""]) -> PyTree:
    """The new `PSGDState.diagnostics`: per leaf, a [`Tracked`][psgd_eqx._diagnostics.Tracked]
    of this step (the old one for a step skipped on non-finite gradients, and for leaves
    that are not trained); a global-group leaf gets the global preconditioner's residual."""
    figs, glob_figs = figures
    n_groups = len(groups.index)
    per_leaf_figs = groups.unstack(figs)
    per_leaf_ratio = groups.unstack(ratios[:n_groups])
    glob_ratio = ratios[n_groups] if len(ratios) > n_groups else None
    new = []
    for i, prev in enumerate(treedef.flatten_up_to(old)):
        fig = glob_figs.get(i, per_leaf_figs[i])
        r = glob_ratio if i in glob_figs else per_leaf_ratio[i]
        if inert[i] or fig is None or r is None:
            new.append(prev)
            continue
        rho = jnp.broadcast_to(jnp.log(r), fig[0].shape)
        now = Tracked(fig[0], fig[1], rho)
        new.append(jax.tree.map(lambda a, b: jnp.where(ok, a, b), now, prev))
    return jax.tree.unflatten(treedef, new)


def _fit_inputs(o: Options, newton: bool, grads: list, m_hat: list, hvps: list,
                vectors: list, finite: Bool[Array, ""]):
    """Per group: what P is fitted on (Hv, or the gradient or momentum when whitening),
    the Newton probes (`None`s when whitening), and whether they are all finite."""
    if newton:
        return hvps, vectors, finite & tree_all_finite(hvps) & tree_all_finite(vectors)
    return (grads if o.whiten_grad else m_hat), [None] * len(grads), finite


def _per_leaf_outputs(groups: Groups, owner, treedef, inert: list[bool], g_leaves: list,
                      out_g: list, glob: dict, mu: list | None, old_mu: list):
    """The updates (a list per leaf) and new momenta (a tree, or `None` without momentum)
    per leaf: one all-to-all back per owned bucket; a leaf in no bucket gets a zero
    update (float0 stays float0) and keeps its momentum."""
    per_leaf = unstack_outputs([out_g, *([mu] if mu is not None else [])], groups, owner)
    out = [glob.get(i, u) for i, u in enumerate(per_leaf[0])]
    out = [(g if g.dtype == jax.dtypes.float0 else jnp.zeros_like(g)) if dead else u
           for dead, g, u in zip(inert, g_leaves, out)]
    new_mu = None if mu is None else jax.tree.unflatten(treedef, [
        o_ if dead else m for dead, m, o_ in zip(inert, per_leaf[1], old_mu)])
    return out, new_mu


def _refit_and_apply(o: Options, groups: Groups, members: list[int], preconds,
                     do_refit: Bool[Array, ""], settings: FitSettings, key, inputs: list,
                     vectors: list, m_hat: list):
    """The refits (all under one `lax.cond` on `do_refit`) and the apply, in the order
    `update_preconditioner_first` says. Owner-computes stacks with padding get both from
    one device-dependent program that skips the padding rows (`_owned_steps`).

    **Returns:** `(per-group preconditioners, global one, what `_apply_all` gives)`.
    """
    newton = settings.newton

    def leaf_keys():  # leaf i's key is keys[i], bucketed or not; then the global one
        keys = _rng.split(key, groups.n + 1)
        return [keys[i] for i in groups.indices()], keys[-1]

    owned_qs, owned_out = {}, {}
    if groups.owned():  # (the keys are derived inside the refit's cond otherwise)
        owned_qs, owned_out = _owned_steps(o, groups, do_refit, settings, preconds[0],
                                           leaf_keys()[0], inputs, vectors, m_hat)
    skip = list(owned_qs)

    def refit(preconds):
        pair = _global_pair(groups, members, inputs, vectors if newton else None)
        per_group_keys, global_key = leaf_keys()
        return refit_groups(preconds, groups, per_group_keys, inputs, vectors, pair,
                            global_key, settings, skip=skip,
                            merge=o.bucket_leaves is not False)

    def maybe_refit(preconds):
        return jax.lax.cond(do_refit, refit, lambda x: x, preconds)

    if o.update_preconditioner_first:
        preconds = maybe_refit(preconds)
        out = _apply_all(o, groups, members, preconds, m_hat, owned_out)
    else:
        out = _apply_all(o, groups, members, preconds, m_hat, owned_out)
        preconds = maybe_refit(preconds)
    qs, gq = preconds
    return [owned_qs.get(g, q) for g, q in enumerate(qs)], gq, out


def step(
    o: Options,
    probability: Callable | None,  # None: set by the adaptive schedule in the step
    precond_lr: Callable,
    grads: PyTree,
    state,
    hvp: PyTree | None,
    vector: PyTree | None,
    override: bool | Bool[ArrayLike, ""] | None,
):
    """One `update` of [`psgd_eqx.scale_by_psgd`][] (see the module docstring).

    **Returns:** `(updates, new PSGDState)`.
    """
    newton = hvp is not None
    g_leaves, treedef = jax.tree.flatten(grads)
    n = len(g_leaves)

    def per_leaf(tree):
        return [None] * n if tree is None else treedef.flatten_up_to(tree)

    # The buckets were fixed at `init` and the preconditioners are stored stacked
    # (`_layout.py`): only the other inputs are stacked here.
    layout = as_layout(state.precond, treedef)
    owner = layout.owner
    # Owner-computes stacks are sharded along the stack axis: there the members' slices
    # stay static (a dynamic index into a sharded axis would gather the whole stack).
    groups = layout.groups if owner else layout.groups.index_at_runtime(state.count)
    members = _global.members(layout.shapes())
    accum = state.fit_accum if not newton else None
    old_mu, old_sums = per_leaf(state.mu), per_leaf(None if accum is None else accum[0])
    # A leaf in no bucket (an int or bool parameter, which is not trained; it has no
    # preconditioner) gets a zero update and keeps its buffers.
    grouped = {i for idx in groups.index for i in idx}
    inert = [i not in grouped for i in range(n)]
    items = [None if dead else item for dead, item in zip(inert, zip(
        g_leaves, old_mu, per_leaf(hvp), per_leaf(vector), old_sums))]
    grads_g, mu, hvps, vectors, sums = stack_inputs(items, groups, owner) or [[]] * 5
    qs = pin_stacks(list(layout.stacks), groups, owner)
    gq = state.global_precond if members else None
    count, finite = state.count, tree_all_finite(grads_g)
    k_refit, k_draw, k_round = _rng.split(state.key, 3)
    key = _rng.successor(state.key)

    m_hat = grads_g
    if state.mu is not None:
        mu, m_hat = _momentum_all(o, groups, count, finite, k_round, mu, grads_g)

    inputs, vectors, fit_ok = _fit_inputs(o, newton, grads_g, m_hat, hvps, vectors, finite)
    if accum is not None:
        sums, n_acc, inputs = accumulate(sums, accum[1], inputs, finite)

    def leafwise(per_group, old):  # the groups' values per leaf, the inert leaves' old
        return [o_ if dead else x for dead, x, o_ in zip(inert, groups.unstack(per_group),
                                                           old)]

    if o.preconditioner_init_scale is None:
        def rescale(preconds):
            scale = _first_step_scale(o, groups, newton, qs, grads_g, vectors, inputs,
                                      finite)
            qs_, gq_ = preconds
            return (_map_q(groups, lambda q: q.rescale(scale), qs_),
                    None if gq_ is None else gq_.rescale(scale))

        qs, gq = jax.lax.cond(count == 0, rescale, lambda x: x, (qs, gq))

    ratios, staleness, rate = _fit_figures(
        o, groups, qs, gq, inputs, vectors,
        _global_pair(groups, members, inputs, vectors if newton else None),
        state.staleness, fit_ok)
    if rate is not None:  # the adaptive schedule's rate for this step
        probability = lambda _: rate  # noqa: E731
    do_refit, acc = refit_decision(count, state.refit_accumulator, fit_ok, k_draw,
                                   probability=probability, bernoulli=o.bernoulli_refit,
                                   override=override)

    settings = FitSettings(newton, o.damping, precond_lr(count), state.normaliser,
                           o.balance_probability, o.stochastic_rounding)

    qs, gq, out = _refit_and_apply(o, groups, members, (qs, gq), do_refit, settings,
                                   k_refit, inputs, vectors, m_hat)

    def merged(per_group, old):
        return jax.tree.unflatten(treedef, leafwise(per_group, old))

    fit_accum = state.fit_accum
    if accum is not None:
        sums, n_acc = restart_after_refit(sums, n_acc, do_refit)
        fit_accum = (merged(sums, old_sums), n_acc)
    out_g, glob, figures = out
    out, new_mu = _per_leaf_outputs(groups, owner, treedef, inert, g_leaves, out_g, glob,
                                    mu if state.mu is not None else None, old_mu)
    new_state = dataclasses.replace(
        state,
        count=optax.safe_increment(count),
        key=key,
        mu=new_mu,
        precond=layout.with_stacks(pin_stacks(qs, groups, owner)),
        refit_accumulator=acc,
        refits=state.refits + do_refit.astype(jnp.int32),
        global_precond=gq if members else state.global_precond,
        fit_accum=fit_accum,
        diagnostics=state.diagnostics if figures is None else _tracked(
            groups, treedef, inert, figures, ratios, state.diagnostics, finite),
        staleness=staleness,
    )
    return jax.tree.unflatten(treedef, out), new_state
