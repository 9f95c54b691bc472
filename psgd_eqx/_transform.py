"""The optimizer around Q: `PSGDState` and the generic `scale_by_psgd` core.

One step (all on device, no host sync):

1. momentum (debiased EMA, or the reference's β_t = min(t/(t+1), β) warm-up);
2. decide whether to refit (deterministic counter or Bernoulli draw of the schedule's
   probability, or the caller's `update_preconditioner`), never on non-finite input;
3. one `lax.cond` around *all* refits of the step (not one per leaf): each leaf draws its
   damped probe (v, h) and takes one Lie-group step — before or after the apply;
4. apply P to the momentum (or gradient), clip per tensor (RMS, then elements).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from ._bucket import bucketed_map
from ._misc import as_key, check_key, check_number, concrete
from ._norms import Normaliser
from ._numerics import (
    abs2,
    compute_dtype,
    has_narrow_float,
    init_scale_from_grads,
    init_scale_from_hvp,
    promote,
    safe_rms,
    stochastic_round,
    tree_all_finite,
    tree_cast_up,
    tree_stochastic_round,
)
from ._precond.base import AbstractPrecond
from ._probe import damped_probe
from ._schedules import as_schedule


class PSGDState(eqx.Module):
    """The state of a PSGD optimizer: an `eqx.Module`, so it serialises with
    `eqx.tree_serialise_leaves` and holds no Python objects.

    **Fields:**

    - `count`: number of `update` calls so far (int32).
    - `key`: the PRNG key for probes, norm bounds and the refit draw.
    - `mu`: the momentum buffer (a pytree like the params), or `None` when `b1 = 0`.
    - `precond`: a pytree with the params' structure whose leaves are the preconditioner
        modules ([`psgd_eqx.KronQ`][], [`psgd_eqx.DiagQ`][], ...) or `None` (no
        preconditioner for that leaf).
    - `refit_accumulator`: the deterministic schedule's accumulated refit probability
        (a refit fires when it reaches 1, so the refit rate equals the probability).
    - `refits`: number of refits done so far (int32), handy for logging.
    - `global_precond`: the one preconditioner over the concatenation of every leaf that
        `structure` mapped to [`psgd_eqx.GLOBAL`][] (`None` if there is none).
    - `fit_accum`: with `precond_grad_accum`, the running sum of the fit inputs since the
        last refit and their number (else `None`).
    - `normaliser`: the (static) step-size normaliser configuration fixed at `init`.
    - `global_mask`: (static) per leaf, in flattening order, whether it is in the global
        group.
    """

    count: Int[Array, ""]
    key: PRNGKeyArray
    mu: PyTree | None
    precond: PyTree
    refit_accumulator: Float[Array, ""]
    refits: Int[Array, ""]
    global_precond: AbstractPrecond | None = None
    fit_accum: tuple[PyTree, Int[Array, ""]] | None = None
    normaliser: Normaliser = eqx.field(static=True, default=Normaliser())
    global_mask: tuple[bool, ...] = eqx.field(static=True, default=())


GLOBAL = "global"
"""Return this from a `structure` callable to put a leaf into the global group: one
preconditioner (built by `global_structure`) over the concatenation of all such leaves."""


def _concat(leaves: list[Array]) -> Array:
    """Row-major flattening of several leaves into one vector, in their common dtype."""
    dtype = promote(*(x.dtype for x in leaves))
    return jnp.concatenate([x.reshape(-1).astype(dtype) for x in leaves])


def _split(flat: Array, like: list[Array]) -> list[Array]:
    """Inverse of `_concat`: pieces with the shapes and dtypes of `like`."""
    out, start = [], 0
    for x in like:
        out.append(flat[start : start + x.size].reshape(x.shape).astype(x.dtype))
        start += x.size
    return out


def _clip(u: Array, max_rms, max_element) -> Array:
    if u.size == 0:
        return u
    if max_rms is not None:
        rms = safe_rms(u)
        target = jnp.asarray(max_rms).astype(rms.dtype)
        factor = jnp.where(rms > target, target / jnp.where(rms > 0, rms, 1.0), 1.0)
        u = u * factor.astype(u.dtype)
    if max_element is not None:
        if jnp.issubdtype(u.dtype, jnp.complexfloating):
            mag = jnp.sqrt(abs2(u))
            bound = jnp.asarray(max_element).astype(mag.dtype)
            u = u / jnp.maximum(mag / bound, 1.0).astype(u.dtype)
        else:
            bound = jnp.asarray(max_element).astype(u.dtype)
            u = jnp.clip(u, -bound, bound)
    return u


def scale_by_psgd(
    structure: Callable[[Any, Array], AbstractPrecond | str | None],
    *,
    global_structure: Callable[[int, Any], AbstractPrecond] | None = None,
    b1: ArrayLike = 0.9,
    momentum_warmup: bool = False,
    whiten_grad: bool = True,
    preconditioner_update_probability: ArrayLike | Callable = 1.0,
    bernoulli_refit: bool = False,
    preconditioner_lr: ArrayLike | Callable = 0.1,
    preconditioner_init_scale: ArrayLike | None = None,
    damping: ArrayLike = 1e-9,
    lipschitz_beta: ArrayLike = 0.9,
    norm_bound: str = "subspace",
    norm_bound_k: ArrayLike = 32,
    norm_bound_iters: ArrayLike = 2,
    balance_probability: ArrayLike = 0.01,
    update_preconditioner_first: bool = True,
    grad_clip_max_amp: ArrayLike | None = 2.0,
    grad_clip_max_element: ArrayLike | None = 10.0,
    mu_dtype=None,
    key: PRNGKeyArray | ArrayLike = 42,
    stochastic_rounding: bool = True,
    precond_grad_accum: bool = False,
    bucket_leaves: bool | str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """The generic PSGD transformation: any preconditioner structure per leaf.

    **Arguments:**

    - `structure`: called once per parameter leaf as `structure(path, leaf)` at `init`;
        returns the leaf's initial preconditioner (e.g. `KronQ.init(leaf.shape)`), `None`
        for plain momentum (P = I) on that leaf, or [`psgd_eqx.GLOBAL`][] to put the leaf
        into the global group. Empty (size-0) leaves are not passed and get `None`.
    - `global_structure`: `global_structure(n, dtype)` builds the one preconditioner over
        the flattened concatenation (n elements, in flattening order) of the global group,
        e.g. `lambda n, dtype: LRAQ.init(n, dtype)`. Needed iff a leaf is `GLOBAL`.
    - `b1`: momentum EMA factor (0 disables momentum; no buffer is kept).
    - `momentum_warmup`: `False` (default): bias-corrected EMA m/(1 − b1ᵗ) as optax;
        `True`: the reference's EMA with βₜ = min(t/(t+1), b1) and no correction.
    - `whiten_grad`: fit P on the raw gradient (`True`, the reference's default: P·m then
        shrinks as gradients vanish) or on the momentum (`False`: a scale-free, sign-like
        update; divide lr by √((1+b1)/(1−b1)) when switching).
    - `preconditioner_update_probability`: refit probability, a constant or a schedule of
        the step count (see [`psgd_eqx.precond_update_prob_schedule`][]).
    - `bernoulli_refit`: `False`: a deterministic accumulator refits whenever the summed
        probability reaches 1 (rate exactly p, no variance); `True`: an independent
        Bernoulli(p) draw per step. The first step always refits.
    - `preconditioner_lr`: μ, a constant or a schedule of the step count.
    - `preconditioner_init_scale`: `None` = data-driven global scale at the first step:
        (maxᵢ mean|gᵢ|⁴ + δ⁴)^(−1/8) for whitening, (Σ|v|²/Σ|Hv|²)^(1/4) for Newton
        fitting (exact for H = c·I); falls back to 1.0 for zero or non-finite inputs. A
        number = that fixed scale.
    - `damping`: δ of the damping noise (δ + eps·|x|)⊙v.
    - `lipschitz_beta`: β_L of the Lipschitz EMA (0 = instantaneous normaliser).
    - `norm_bound`, `norm_bound_k`, `norm_bound_iters`: the spectral-norm lower bound
        (`"subspace"` with k rows and half-iterations, or `"one_step"`).
    - `balance_probability`: probability per refit of rebalancing Kron factors.
    - `update_preconditioner_first`: refit before applying P (the reference's default,
        lower variance) or after (unbiased: the step uses a P independent of this g).
    - `grad_clip_max_amp`: per-tensor RMS ceiling of the preconditioned update (`None`
        disables).
    - `grad_clip_max_element`: element-wise clip after the RMS clip (`None` disables).
    - `mu_dtype`: storage dtype of the momentum (default: the gradient's dtype).
    - `key`: a PRNG key or an int seed.
    - `stochastic_rounding`: when the momentum or a preconditioner is stored in bfloat16
        (`mu_dtype`, `precond_dtype`), compute in f32 and round stochastically on write
        (unbiased: tiny updates are not lost to rounding); `False` rounds to nearest.
    - `precond_grad_accum`: fit on the average of the fit inputs (gradients, or momenta
        with `whiten_grad=False`) since the last refit instead of the latest one (an
        extra params-sized f32 buffer). Averaging k inputs shrinks their noise, so with
        refits every k steps the fitted P grows by up to √k for pure-noise gradients.
        Ignored for Newton fitting.
    - `bucket_leaves`: refit (and apply) the preconditioners of leaves with identical
        structure and shapes (e.g. every layer's query weight) in one `vmap`ped call per
        bucket instead of one call per leaf: far fewer ops in the step's XLA graph and a
        faster compile. The state stays per leaf and results agree up to float rounding.
        `"auto"` (default) buckets the refits everywhere and the applies on GPU/TPU only
        (on CPU a batched small matmul is slower than separate ones; see
        `benchmarks/bucketing.py`); `True` buckets both, `False` neither.

    **Returns:** an `optax.GradientTransformationExtraArgs`. Its `update` accepts
    `update(updates, state, params=None, *, Hvp=None, vector=None,
    update_preconditioner=None, **extra_args)`: with `Hvp` and `vector` the fit is
    Newton-type on the pair (vector, Hvp) instead of whitening; `update_preconditioner`
    (a bool scalar) overrides the refit schedule.
    """
    check_number("b1", b1, 0.0, 1.0, hi_open=True)
    check_number("preconditioner_lr", preconditioner_lr, 0.0, float("inf"), lo_open=True)
    check_number(
        "preconditioner_update_probability",
        preconditioner_update_probability,
        0.0,
        1.0,
        lo_open=True,
    )
    check_number("damping", damping, 0.0, float("inf"))
    check_number("balance_probability", balance_probability, 0.0, 1.0)
    if preconditioner_init_scale is not None:
        check_number(
            "preconditioner_init_scale",
            preconditioner_init_scale,
            0.0,
            float("inf"),
            lo_open=True,
            hi_open=True,
        )
    if grad_clip_max_amp is not None:
        check_number("grad_clip_max_amp", grad_clip_max_amp, 0.0, float("inf"), lo_open=True)
    if grad_clip_max_element is not None:
        check_number(
            "grad_clip_max_element", grad_clip_max_element, 0.0, float("inf"), lo_open=True
        )
    if not whiten_grad and concrete(b1) == 0:
        raise ValueError("`whiten_grad=False` (fit on the momentum) needs `b1 > 0`; got b1=0.")
    check_key(key)
    norm_args = [concrete(x) for x in (lipschitz_beta, norm_bound_k, norm_bound_iters)]
    if all(x is not None for x in norm_args):
        Normaliser(float(norm_args[0]), norm_bound, int(norm_args[1]), int(norm_args[2]))
    if bucket_leaves not in (True, False, "auto"):
        raise ValueError(f"`bucket_leaves` must be True, False or 'auto'; got {bucket_leaves!r}.")
    # decided when the update is traced, i.e. for the backend it is compiled for
    bucket_apply = bucket_leaves is True or (
        bucket_leaves == "auto" and jax.default_backend() != "cpu"
    )
    prob_fn = as_schedule(preconditioner_update_probability, "preconditioner_update_probability")
    plr_fn = as_schedule(preconditioner_lr, "preconditioner_lr")
    data_driven_init = preconditioner_init_scale is None

    def init_fn(params):
        beta_l, k, iters = (concrete(x) for x in (lipschitz_beta, norm_bound_k, norm_bound_iters))
        # Round β_L through f32 so a plain and an inject_hyperparams optimizer (which casts
        # it to an f32 array) build identical static state.
        normaliser = Normaliser(float(np.float32(beta_l)), norm_bound, int(k), int(iters))
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        preconds, mask = [], []
        for path, p in leaves_with_path:
            # An empty leaf has nothing to precondition (and no statistics to fit).
            q = structure(path, p) if int(np.prod(p.shape)) > 0 else None
            is_global = isinstance(q, str)
            if is_global and q != GLOBAL:
                raise ValueError(
                    f"`structure` returned {q!r} for {jax.tree_util.keystr(path)}; expected a "
                    f"preconditioner, None or psgd_eqx.GLOBAL ({GLOBAL!r})."
                )
            if is_global:
                q = None
            elif q is not None and not isinstance(q, AbstractPrecond):
                raise ValueError(
                    f"`structure` returned {type(q).__name__} for "
                    f"{jax.tree_util.keystr(path)}; expected an AbstractPrecond, None or GLOBAL."
                )
            if q is not None and not data_driven_init:
                q = q.rescale(preconditioner_init_scale)
            preconds.append(q)
            mask.append(is_global)
        precond = jax.tree_util.tree_unflatten(treedef, preconds)
        gq = None
        if any(mask):
            if global_structure is None:
                raise ValueError(
                    "`structure` put leaves into the GLOBAL group but `global_structure` is None."
                )
            glob = [p for (_, p), m in zip(leaves_with_path, mask) if m]
            n = sum(int(np.prod(p.shape)) for p in glob)
            gq = global_structure(n, promote(*(p.dtype for p in glob)))
            if not data_driven_init:
                gq = gq.rescale(preconditioner_init_scale)
        mu = None
        if concrete(b1) != 0:
            mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params)
        # Separate buffers per field, so a jitted step can donate the whole state.
        count, refits = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
        acc = jnp.zeros([], jnp.float32)
        fit_accum = None
        if precond_grad_accum:
            sums = jax.tree.map(lambda p: jnp.zeros(p.shape, compute_dtype(p.dtype)), params)
            fit_accum = (sums, jnp.zeros([], jnp.int32))
        return PSGDState(
            # () when nothing is global: the state's static metadata then does not depend
            # on the number of leaves (optax.tree.map_params inits on a leafless tree).
            count, as_key(key), mu, precond, acc, refits, gq, fit_accum, normaliser,
            tuple(mask) if any(mask) else (),
        )

    def update_fn(
        updates,
        state: PSGDState,
        params=None,
        *,
        Hvp=None,
        vector=None,
        update_preconditioner: bool | Bool[ArrayLike, ""] | None = None,
        **extra_args,
    ):
        del params, extra_args
        if (Hvp is None) != (vector is None):
            raise ValueError("`Hvp` and `vector` must be given together for Newton fitting.")
        grads = updates
        g_leaves, treedef = jax.tree.flatten(grads)
        q_leaves = treedef.flatten_up_to(state.precond)
        count = state.count
        finite = tree_all_finite(grads)
        key, k_refit, k_draw, k_round = jax.random.split(state.key, 4)

        normaliser = state.normaliser
        # 1. momentum (a non-finite gradient leaves the buffer untouched)
        if state.mu is not None:
            mu_leaves = treedef.flatten_up_to(state.mu)
            t = count.astype(jnp.float32)
            if momentum_warmup:
                beta = jnp.minimum(t / (t + 1.0), jnp.asarray(b1).astype(jnp.float32))
                debias = jnp.ones([], jnp.float32)
            else:
                beta = jnp.asarray(b1).astype(jnp.float32)
                debias = 1.0 - beta ** (t + 1.0)
            new_mu, m_hat = [], []
            for m, g in zip(mu_leaves, g_leaves):
                cd = compute_dtype(promote(m.dtype, g.dtype))
                nm = beta.astype(cd) * m.astype(cd) + (1.0 - beta).astype(cd) * g.astype(cd)
                written = nm.astype(m.dtype)
                if stochastic_rounding and jnp.dtype(m.dtype) == jnp.dtype(jnp.bfloat16):
                    k_leaf = jax.random.fold_in(k_round, len(new_mu))
                    written = stochastic_round(nm, m.dtype, k_leaf)
                new_mu.append(jnp.where(finite, written, m))
                m_hat.append((nm / debias.astype(cd)).astype(g.dtype))
            mu = jax.tree.unflatten(treedef, new_mu)
        else:
            mu = None
            m_hat = g_leaves

        # 2. the refit decision
        newton = Hvp is not None
        if newton:
            fit_leaves = treedef.flatten_up_to(Hvp)
            v_leaves = treedef.flatten_up_to(vector)
            fit_ok = finite & tree_all_finite(Hvp) & tree_all_finite(vector)
        else:
            fit_leaves = g_leaves if whiten_grad else m_hat
            v_leaves = [None] * len(g_leaves)
            fit_ok = finite
        fit_accum = state.fit_accum
        if fit_accum is not None and not newton:
            # average the fit input over the steps since the last refit (skipping
            # non-finite steps, which the momentum skips too)
            sums, n = fit_accum
            sums = [
                jnp.where(finite, s + x.astype(s.dtype), s)
                for s, x in zip(treedef.flatten_up_to(sums), fit_leaves)
            ]
            n = n + finite.astype(jnp.int32)
            denom = jnp.maximum(n, 1)
            fit_leaves = [(s / denom.astype(s.dtype)).astype(x.dtype)
                          for s, x in zip(sums, fit_leaves)]
        acc = state.refit_accumulator
        if update_preconditioner is not None:
            want = jnp.asarray(update_preconditioner, bool)
            do_refit = want & fit_ok
        else:
            prob = prob_fn(count)
            if bernoulli_refit:
                want = jax.random.uniform(k_draw) < prob
            else:
                # Accumulate the probability and fire when it reaches 1: the refit rate is
                # exactly p (also while p anneals), with no sampling variance.
                acc = acc + prob
                want = acc >= 1.0
            want = want | (count == 0)
            do_refit = want & fit_ok
            if not bernoulli_refit:
                acc = jnp.where(do_refit, jnp.maximum(acc - 1.0, 0.0), acc)

        gmask = state.global_mask or (False,) * len(g_leaves)
        gidx = [i for i, m in enumerate(gmask) if m]
        gq = state.global_precond

        # data-driven init: Q = scale·I from the first gradient (or (v, Hv) pair), in jit
        if data_driven_init:

            def _rescale(qs_gq):
                qs, g = qs_gq
                if newton:
                    scale = init_scale_from_hvp(v_leaves, fit_leaves)
                else:
                    scale = init_scale_from_grads(g_leaves, damping)
                qs = [None if q is None else q.rescale(scale) for q in qs]
                return qs, (None if g is None else g.rescale(scale))

            q_leaves, gq = jax.lax.cond(
                count == 0, _rescale, lambda x: (list(x[0]), x[1]), (list(q_leaves), gq)
            )

        plr = plr_fn(count)

        def refit(qs_gq):
            qs, g = qs_gq
            keys = jax.random.split(k_refit, len(qs) + 1)
            items = [
                None if q is None else (q, keys[i], x, v)
                for i, (q, x, v) in enumerate(zip(qs, fit_leaves, v_leaves))
            ]
            out = bucketed_map(_fit, items, bucket_leaves is not False)
            if g is not None:
                x = _concat([fit_leaves[i] for i in gidx])
                v = None if not newton else _concat([v_leaves[i] for i in gidx])
                g = _fit(g, keys[-1], x, v)
            return out, g

        def _fit(q, key, x, v):
            k_probe, k_step, k_sr = jax.random.split(key, 3)
            vv, hh = damped_probe(k_probe, x, damping, v)
            pass_v = vv if (newton or q.needs_v) else None
            narrow = stochastic_rounding and has_narrow_float(q)
            # bf16 storage: fit on an f32 copy, then round the result stochastically, in
            # this one place for every structure.
            new = (tree_cast_up(q) if narrow else q).update(
                pass_v,
                hh,
                lr=plr,
                key=k_step,
                normaliser=normaliser,
                balance_probability=balance_probability,
            )
            return tree_stochastic_round(new, q, k_sr) if narrow else new

        def maybe_refit(qs_gq):
            return jax.lax.cond(
                do_refit, refit, lambda x: (list(x[0]), x[1]), (list(qs_gq[0]), qs_gq[1])
            )

        def clip(u):
            return _clip(u, grad_clip_max_amp, grad_clip_max_element)

        def precondition(qs_gq):
            qs, g = qs_gq
            items = [None if q is None else (q, m) for q, m in zip(qs, m_hat)]
            us = bucketed_map(lambda q, m: clip(q.apply(m)), items, bucket_apply)
            us = [clip(m) if q is None else u for q, m, u in zip(qs, m_hat, us)]
            if g is not None:
                flat = g.apply(_concat([m_hat[i] for i in gidx]))
                for i, u in zip(gidx, _split(flat, [m_hat[i] for i in gidx])):
                    us[i] = clip(u)
            return us

        if update_preconditioner_first:
            q_leaves, gq = maybe_refit((q_leaves, gq))
            out = precondition((q_leaves, gq))
        else:
            out = precondition((q_leaves, gq))
            q_leaves, gq = maybe_refit((q_leaves, gq))

        if fit_accum is not None and not newton:
            sums = [jnp.where(do_refit, jnp.zeros_like(x), x) for x in sums]
            fit_accum = (jax.tree.unflatten(treedef, sums), jnp.where(do_refit, 0, n))

        new_state = PSGDState(
            count=optax.safe_increment(count),
            key=key,
            mu=mu,
            precond=jax.tree.unflatten(treedef, q_leaves),
            refit_accumulator=acc,
            refits=state.refits + do_refit.astype(jnp.int32),
            global_precond=gq,
            fit_accum=fit_accum,
            normaliser=normaliser,
            global_mask=state.global_mask,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
