"""User-facing optimizers: structure rule + `scale_by_psgd` + weight decay + learning rate."""

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec
from jaxtyping import ArrayLike, PRNGKeyArray, PyTree

from ._geometry import canonical_geometry
from ._misc import as_key, concrete, init_int
from ._numerics import storage_dtype
from ._ops import check_use_kernels
from ._plan import (
    LeafPlan,
    kron_plan,
    validate_structure_rules,
)
from ._precond import LRAQ, AffineQ, BlockedQ, DenseQ, DiagQ, KronQ, StackedQ, XMatQ
from ._shapes import affine_dense_sides
from ._sharding import state_partition_specs
from ._transform import GLOBAL, scale_by_psgd


def _fit_target(whiten_grad: bool | None, momentum_into_precond_update: bool | None) -> bool:
    """Reconcile the reference's `whiten_grad` with psgd_jax's `momentum_into_precond_update`."""
    if whiten_grad is not None and momentum_into_precond_update is not None:
        if bool(whiten_grad) == bool(momentum_into_precond_update):
            raise ValueError(
                "`whiten_grad` and `momentum_into_precond_update` contradict each other: "
                f"got whiten_grad={whiten_grad!r}, "
                f"momentum_into_precond_update={momentum_into_precond_update!r}."
            )
    if whiten_grad is not None:
        return bool(whiten_grad)
    if momentum_into_precond_update is not None:
        return not bool(momentum_into_precond_update)
    return True


def scale_by_kron(
    *,
    b1: ArrayLike = 0.9,
    preconditioner_update_probability: ArrayLike | Callable = 1.0,
    max_size_triangular: ArrayLike = 8192,
    min_ndim_triangular: ArrayLike = 2,
    max_skew_triangular: ArrayLike = float("inf"),
    memory_save_mode: str | None = None,
    preconditioner_lr: ArrayLike | Callable = 0.1,
    preconditioner_init_scale: ArrayLike | None = None,
    geometry: str = "PRO",
    mu_dtype=None,
    precond_dtype=None,
    whiten_grad: bool | None = None,
    momentum_into_precond_update: bool | None = None,
    cache_preconditioner: bool = False,
    key: PRNGKeyArray | ArrayLike = 42,
    momentum_warmup: bool = False,
    bernoulli_refit: bool = False,
    damping: ArrayLike = 1e-9,
    lipschitz_beta: ArrayLike = 0.9,
    norm_bound: str = "subspace",
    norm_bound_k: ArrayLike = 32,
    norm_bound_iters: ArrayLike = 2,
    balance_probability: ArrayLike = 0.01,
    update_preconditioner_first: bool = True,
    grad_clip_max_amp: ArrayLike | None = 2.0,
    grad_clip_max_element: ArrayLike | None = 10.0,
    scanned_layers: Any = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: ArrayLike = 8,
    stochastic_rounding: bool = True,
    memory_budget_bytes: ArrayLike | None = None,
    precond_grad_accum: bool = False,
    merge_small_dims: bool = False,
    target_merged_dim_size: ArrayLike = 4096,
    partition_grads_into_blocks: bool = False,
    block_size: ArrayLike = 256,
    params_partition_specs: Any = None,
    preconditioner_partition_spec: Any = None,
    bucket_leaves: bool | str = "auto",
    use_kernels: bool | str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """Kronecker-factored PSGD (no learning rate, no weight decay): P·m, clipped.

    Every parameter gets a [`psgd_eqx.KronQ`][]; which axes are dense follows the structure
    rules (see [`psgd_eqx.kron_plan`][]).

    **Arguments:**

    - `b1`: momentum (0.9).
    - `preconditioner_update_probability`: refit probability, constant or schedule (1.0;
        use [`psgd_eqx.precond_update_prob_schedule`][]`()` for psgd_jax's 1 → 0.03 anneal).
    - `max_size_triangular`, `min_ndim_triangular`, `max_skew_triangular`,
        `memory_save_mode`: structure rules (defaults 8192, 2, ∞, `None`: psgd_jax's).
    - `preconditioner_lr`: μ (0.1), constant or schedule.
    - `preconditioner_init_scale`: `None` (data-driven from the first gradient) or a number.
    - `geometry`: `"PRO"` (= `"Q0.5EQ1.5"`, default), `"EQ"`, `"QEQ"`, `"QEP"`, `"QUAD"`,
        `"PRO4P"` or `"QUAD4P"`.
    - `mu_dtype`: momentum storage dtype (default: the gradient's).
    - `precond_dtype`: factor storage dtype (default: f32, or the params' dtype if wider
        or complex); the fit is always computed in ≥ f32 and L kept in f32.
    - `whiten_grad` / `momentum_into_precond_update`: fit on the gradient (default) or on
        the momentum; either name works, they must not contradict each other.
    - `cache_preconditioner`: store Pᵢ = QᵢᴴQᵢ of dense factors (recomputed at each refit):
        one product per axis per step instead of two, for twice the factor memory.
    - `key`: PRNG key or int seed.
    - `momentum_warmup`, `bernoulli_refit`, `damping`, `lipschitz_beta`, `norm_bound`,
        `norm_bound_k`, `norm_bound_iters`, `balance_probability`,
        `update_preconditioner_first`, `grad_clip_max_amp`, `grad_clip_max_element`: see
        [`psgd_eqx.scale_by_psgd`][].
    - `scanned_layers`: leaves whose leading axis stacks layers (built with
        `eqx.filter_vmap`, run with `lax.scan`): a pytree of bools like the params, or a
        callable `(path, leaf) -> bool`. Each such leaf gets one preconditioner per layer
        ([`psgd_eqx.StackedQ`][]), the structure rules applied to one layer's shape.
    - `lax_map_scanned_layers`, `lax_map_batch_size`: run the per-layer work with
        `lax.map` over batches of this many layers instead of one `vmap` (less peak
        memory for deep stacks). With `optax.inject_hyperparams` pass the pytree form
        (it would call a function as a schedule).
    - `stochastic_rounding`: round bf16 momentum/factor writes stochastically (see
        [`psgd_eqx.scale_by_psgd`][]).
    - `memory_budget_bytes`: a cap on the total preconditioner state; at `init` the
        largest dense factors are demoted to diagonal until it holds (see
        [`psgd_eqx.kron_plan`][] and [`psgd_eqx.plan_table`][] for the result).
    - `precond_grad_accum`: fit on the average of the inputs since the last refit (see
        [`psgd_eqx.scale_by_psgd`][]).
    - `merge_small_dims`, `target_merged_dim_size`: merge adjacent small axes (off by
        default; distributed_kron's names), and `partition_grads_into_blocks`,
        `block_size`: cut axes longer than `max_size_triangular` into dense blocks
        instead of giving them a diagonal factor. See [`psgd_eqx.kron_plan`][] for the
        rules and the memory cap.
    - `params_partition_specs`, `preconditioner_partition_spec`: distributed_kron's
        sharding options (a tree of `PartitionSpec`s like the params; one spec for every
        dense factor). When a mesh is set with `jax.set_mesh`, `update` constrains the
        new state and the updates to the specs of
        [`psgd_eqx.get_opt_state_partition_specs`][]; without one they are only used by
        that function. Either way, jit `init`/`update` with those shardings.
    - `bucket_leaves`: one batched refit/apply per group of same-shape leaves (see
        [`psgd_eqx.scale_by_psgd`][]).
    - `use_kernels`: Pallas kernels for the hot ops: `"auto"` (on GPU where measured
        faster than XLA: so far the `EQ` factor update for n ≥ 2048), `True` (on GPU/TPU
        wherever a kernel exists), `False` (never), `"interpret"` (the Pallas interpreter
        on any platform, for tests). See [Kernels](../api/kernels.md).

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state contains one
    [`psgd_eqx.PSGDState`][].
    """
    validate_structure_rules(
        max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode
    )
    geometry = canonical_geometry(geometry)
    wg = _fit_target(whiten_grad, momentum_into_precond_update)
    rules = dict(
        max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular,
        max_skew_triangular=max_skew_triangular,
        memory_save_mode=memory_save_mode,
    )
    if precond_dtype is not None:
        precond_dtype = jnp.dtype(precond_dtype)

    check_use_kernels(use_kernels)
    block_size_int = init_int("block_size", block_size, 2)
    init_int("target_merged_dim_size", target_merged_dim_size, 1)
    plans: dict = {}  # filled by init_fn from the whole-tree plan, read by structure

    def structure(path, p):
        dtype = storage_dtype(p.dtype, precond_dtype)
        lp = plans[jax.tree_util.keystr(path)]

        def make(shape):
            if not lp.blocks:
                return KronQ.init(
                    shape, dtype, dense=lp.dense, geometry=geometry,
                    cache_preconditioner=cache_preconditioner,
                    merged=lp.axes if lp.merged else None, use_kernels=use_kernels,
                )

            def block(s):
                return KronQ.init(s, dtype, dense=lp.dense, geometry=geometry,
                                  cache_preconditioner=cache_preconditioner, merged=s,
                                  use_kernels=use_kernels)

            sizes = tuple(
                None if b == ((1, n),) else block_size_int for b, n in zip(lp.blocks, lp.axes)
            )
            return BlockedQ.init(block, shape, lp.axes, sizes)

        if not lp.scanned:
            return make(p.shape)
        batch = None
        if lax_map_scanned_layers:
            batch = init_int("lax_map_batch_size", lax_map_batch_size, 1)
        return StackedQ.init(make, p.shape, map_batch_size=batch)

    inner = scale_by_psgd(
        structure,
        b1=b1,
        whiten_grad=wg,
        preconditioner_update_probability=preconditioner_update_probability,
        preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale,
        mu_dtype=mu_dtype,
        key=key,
        momentum_warmup=momentum_warmup,
        bernoulli_refit=bernoulli_refit,
        damping=damping,
        lipschitz_beta=lipschitz_beta,
        norm_bound=norm_bound,
        norm_bound_k=norm_bound_k,
        norm_bound_iters=norm_bound_iters,
        balance_probability=balance_probability,
        update_preconditioner_first=update_preconditioner_first,
        grad_clip_max_amp=grad_clip_max_amp,
        grad_clip_max_element=grad_clip_max_element,
        stochastic_rounding=stochastic_rounding,
        precond_grad_accum=precond_grad_accum,
        bucket_leaves=bucket_leaves,
    )
    def init_fn(params):
        plan = kron_plan(
            params,
            **rules,
            geometry=geometry,
            precond_dtype=precond_dtype,
            cache_preconditioner=cache_preconditioner,
            scanned_layers=scanned_layers,
            memory_budget_bytes=memory_budget_bytes,
            merge_small_dims=merge_small_dims,
            target_merged_dim_size=target_merged_dim_size,
            partition_grads_into_blocks=partition_grads_into_blocks,
            block_size=block_size,
        )
        flat = jax.tree_util.tree_flatten_with_path(
            plan, is_leaf=lambda x: isinstance(x, LeafPlan)
        )[0]
        plans.clear()
        plans.update({jax.tree_util.keystr(path): lp for path, lp in flat})
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra):
        updates, state = inner.update(updates, state, params, **extra)
        mesh = jax.sharding.get_abstract_mesh()
        wants = params_partition_specs is not None or preconditioner_partition_spec is not None
        if wants and mesh is not None and not mesh.empty:
            pspecs = params_partition_specs
            if pspecs is None:
                pspecs = jax.tree.map(lambda _: PartitionSpec(), updates)
            specs = state_partition_specs(
                state, updates, pspecs, mesh=mesh,
                preconditioner_partition_spec=preconditioner_partition_spec,
            )
            state = jax.lax.with_sharding_constraint(state, specs)
            updates = jax.lax.with_sharding_constraint(updates, pspecs)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kron(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    weight_decay: ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    preconditioner_update_probability: ArrayLike | Callable = 1.0,
    max_size_triangular: ArrayLike = 8192,
    min_ndim_triangular: ArrayLike = 2,
    max_skew_triangular: ArrayLike = float("inf"),
    memory_save_mode: str | None = None,
    preconditioner_lr: ArrayLike | Callable = 0.1,
    preconditioner_init_scale: ArrayLike | None = None,
    geometry: str = "PRO",
    mu_dtype=None,
    precond_dtype=None,
    whiten_grad: bool | None = None,
    momentum_into_precond_update: bool | None = None,
    cache_preconditioner: bool = False,
    key: PRNGKeyArray | ArrayLike = 42,
    momentum_warmup: bool = False,
    bernoulli_refit: bool = False,
    damping: ArrayLike = 1e-9,
    lipschitz_beta: ArrayLike = 0.9,
    norm_bound: str = "subspace",
    norm_bound_k: ArrayLike = 32,
    norm_bound_iters: ArrayLike = 2,
    balance_probability: ArrayLike = 0.01,
    update_preconditioner_first: bool = True,
    grad_clip_max_amp: ArrayLike | None = 2.0,
    grad_clip_max_element: ArrayLike | None = 10.0,
    scanned_layers: Any = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: ArrayLike = 8,
    stochastic_rounding: bool = True,
    memory_budget_bytes: ArrayLike | None = None,
    precond_grad_accum: bool = False,
    merge_small_dims: bool = False,
    target_merged_dim_size: ArrayLike = 4096,
    partition_grads_into_blocks: bool = False,
    block_size: ArrayLike = 256,
    params_partition_specs: Any = None,
    preconditioner_partition_spec: Any = None,
    bucket_leaves: bool | str = "auto",
    use_kernels: bool | str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """PSGD with Kronecker-factored preconditioners: the drop-in optax optimizer.

    `optax.chain(scale_by_kron(...), add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))`, i.e. θ ← θ − lr·(clip(P·m) + wd·θ), weight
    decay coupled to the lr as in `optax.adamw`. See
    [Learning rates and weight decay](../guides/learning_rates.md) for porting lr/wd from
    Adam and from the other PSGD implementations.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule (1e-3: with the default gradient
        whitening the update has roughly Adam's scale).
    - `b1`: momentum.
    - `weight_decay`: decoupled (lr-scaled) weight decay, ≥ 0.
    - `weight_decay_mask`: a pytree of bools or a callable, as in `optax.adamw`.
    - the other arguments: see [`psgd_eqx.scale_by_kron`][].

    **Returns:** an `optax.GradientTransformationExtraArgs`.

    !!! Example

        ```python
        opt = psgd_eqx.kron(learning_rate=1e-3)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ```
    """
    scale = scale_by_kron(
        b1=b1,
        preconditioner_update_probability=preconditioner_update_probability,
        max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular,
        max_skew_triangular=max_skew_triangular,
        memory_save_mode=memory_save_mode,
        preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale,
        geometry=geometry,
        mu_dtype=mu_dtype,
        precond_dtype=precond_dtype,
        whiten_grad=whiten_grad,
        momentum_into_precond_update=momentum_into_precond_update,
        cache_preconditioner=cache_preconditioner,
        key=key,
        momentum_warmup=momentum_warmup,
        bernoulli_refit=bernoulli_refit,
        damping=damping,
        lipschitz_beta=lipschitz_beta,
        norm_bound=norm_bound,
        norm_bound_k=norm_bound_k,
        norm_bound_iters=norm_bound_iters,
        balance_probability=balance_probability,
        update_preconditioner_first=update_preconditioner_first,
        grad_clip_max_amp=grad_clip_max_amp,
        grad_clip_max_element=grad_clip_max_element,
        scanned_layers=scanned_layers,
        lax_map_scanned_layers=lax_map_scanned_layers,
        lax_map_batch_size=lax_map_batch_size,
        stochastic_rounding=stochastic_rounding,
        memory_budget_bytes=memory_budget_bytes,
        precond_grad_accum=precond_grad_accum,
        merge_small_dims=merge_small_dims,
        target_merged_dim_size=target_merged_dim_size,
        partition_grads_into_blocks=partition_grads_into_blocks,
        block_size=block_size,
        params_partition_specs=params_partition_specs,
        preconditioner_partition_spec=preconditioner_partition_spec,
        bucket_leaves=bucket_leaves,
        use_kernels=use_kernels,
    )
    return _with_lr_and_decay(scale, learning_rate, weight_decay, weight_decay_mask)


def _with_lr_and_decay(
    scale: optax.GradientTransformationExtraArgs,
    learning_rate,
    weight_decay,
    weight_decay_mask,
    global_norm_clip=None,
) -> optax.GradientTransformationExtraArgs:
    """chain(scale, [clip_by_global_norm], [add_decayed_weights], scale_by_learning_rate)."""
    if concrete(weight_decay) is not None and not concrete(weight_decay) >= 0:
        raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay!r}.")
    if not callable(learning_rate) and concrete(learning_rate) is not None and not (
        concrete(learning_rate) >= 0
    ):
        raise ValueError(f"`learning_rate` must be >= 0; got {learning_rate!r}.")
    parts = [scale]
    if global_norm_clip is not None:
        if not global_norm_clip > 0:
            raise ValueError(f"`update_global_norm_clip` must be > 0; got {global_norm_clip!r}.")
        parts.append(optax.clip_by_global_norm(global_norm_clip))
    # Skip the no-op decay only for a Python 0: an array (inject_hyperparams) must give the
    # same chain at init (concrete) and in update (traced).
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


# psgd_jax's names for the same settings (xmat / low_rank_approximation / affine).
_RENAMED = {
    "precond_lr": "preconditioner_lr",
    "precond_init_scale": "preconditioner_init_scale",
    "seed": "key",
}
# psgd_jax options we implement differently: accepted at their psgd_jax default only.
_FIXED_LEGACY = {"step_normalizer_order": "2nd", "precision": "tensorfloat32", "nesterov": False}


def _is_default(name: str, value) -> bool:
    """Whether `value` is `scale_by_psgd`'s default for `name` (also as an f32 array, the
    form `optax.inject_hyperparams` gives it)."""
    default = inspect.signature(scale_by_psgd).parameters[name].default
    if value is None or default is None or isinstance(value, (str, bool)):
        return value is default or value == default
    value = concrete(value)
    if value is None:  # traced (inject_hyperparams inside jit): checked at init already
        return True
    try:
        return bool(np.isclose(value, default, rtol=1e-6))
    except TypeError:
        return False


def _legacy_kwargs(kwargs: dict) -> dict:
    """Map psgd_jax argument names onto ours; reject settings we cannot honour.

    A legacy name set to `None` counts as absent (that is its default in the aliases'
    signatures, which `optax.inject_hyperparams` passes explicitly).
    """
    out = dict(kwargs)
    for old, new in _RENAMED.items():
        if old in out:
            value = out.pop(old)
            if value is None:
                continue
            if new in out and not _is_default(new, out[new]):
                raise ValueError(f"pass only one of `{old}` and `{new}`.")
            out[new] = value
    for name, ok in _FIXED_LEGACY.items():
        if name in out:
            value = out.pop(name)
            if value is not None and value != ok:
                raise ValueError(
                    f"`{name}={value!r}` is not supported (psgd_eqx always uses the "
                    f"equivalent of {ok!r}: a Lipschitz-normalised step in ≥ f32)."
                )
    return out


def psgd(
    learning_rate: optax.ScalarOrSchedule,
    structure: Callable[[Any, Any], Any],
    *,
    global_structure: Callable[[int, Any], Any] | None = None,
    weight_decay: ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    update_global_norm_clip: float | None = None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """The generic PSGD optimizer: your own preconditioner structure per leaf.

    `optax.chain(scale_by_psgd(structure, ...), [clip_by_global_norm],
    [add_decayed_weights], scale_by_learning_rate(learning_rate))`.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `structure`: `structure(path, leaf)` → a preconditioner, `None` (plain momentum) or
        [`psgd_eqx.GLOBAL`][]; see [`psgd_eqx.scale_by_psgd`][].
    - `global_structure`: `global_structure(n, dtype)` → the global group's
        preconditioner.
    - `weight_decay`, `weight_decay_mask`: decoupled (lr-scaled) weight decay, as
        `optax.adamw`.
    - `update_global_norm_clip`: clip the preconditioned update's global norm (psgd_jax's
        option; `None` = off).
    - `**kwargs`: every other option of [`psgd_eqx.scale_by_psgd`][] (psgd_jax's
        `precond_lr`, `precond_init_scale` and `seed` are accepted as aliases).

    **Returns:** an `optax.GradientTransformationExtraArgs`.

    !!! Example

        ```python
        def structure(path, leaf):
            name = jax.tree_util.keystr(path)
            if "embed" in name:
                return psgd_eqx.DiagQ.init(leaf.shape)
            if leaf.ndim == 2:
                return psgd_eqx.KronQ.init(leaf.shape)
            return psgd_eqx.GLOBAL  # everything else shares one dense Q

        opt = psgd_eqx.psgd(1e-3, structure,
                            global_structure=lambda n, dt: psgd_eqx.DenseQ.init(n, dt))
        ```
    """
    kwargs = _legacy_kwargs(kwargs)
    scale = scale_by_psgd(structure, global_structure=global_structure, **kwargs)
    return _with_lr_and_decay(
        scale, learning_rate, weight_decay, weight_decay_mask, update_global_norm_clip
    )


def _flat_alias(
    make: Callable[[tuple[int, ...], Any], Any],
    learning_rate,
    per_leaf: bool,
    precond_dtype,
    defaults: dict,
    kwargs: dict,
) -> optax.GradientTransformationExtraArgs:
    """An alias whose structure is one `make(shape, dtype)` per leaf or over all leaves."""
    mask = kwargs.pop("mask", None)  # psgd_jax's name for the weight-decay mask
    if mask is not None:
        if kwargs.get("weight_decay_mask") is not None:
            raise ValueError("pass only one of `mask` and `weight_decay_mask`.")
        kwargs["weight_decay_mask"] = mask
    kwargs = {**defaults, **kwargs}

    def structure(path, p):
        del path
        if per_leaf:
            return make(p.shape, storage_dtype(p.dtype, precond_dtype))
        return GLOBAL

    def global_structure(n, dtype):
        return make((n,), storage_dtype(dtype, precond_dtype))

    return psgd(learning_rate, structure, global_structure=global_structure, **kwargs)


# psgd_jax's defaults for its xmat / LRA / affine optimizers: no update clipping.
_PSGD_JAX_DEFAULTS = dict(grad_clip_max_amp=None, grad_clip_max_element=None)


def xmat(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    geometry: str = "EQ",
    per_leaf: bool = False,
    precond_dtype=None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with the X-shaped preconditioner [`psgd_eqx.XMatQ`][] (psgd_jax's `xmat`).

    One global X-matrix over all parameters (memory 2n), or one per leaf.

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    - `geometry`: `"EQ"` (psgd_jax's XMat rule) or any of [`psgd_eqx.GEOMETRIES`][].
    - `per_leaf`: one preconditioner per leaf instead of one over all leaves.
    - `precond_dtype`: storage dtype (default f32, or the params' if wider).
    - `**kwargs`: the options of [`psgd_eqx.psgd`][] / [`psgd_eqx.scale_by_psgd`][] and
        psgd_jax's names (`b1`, `preconditioner_update_probability`, `precond_lr`,
        `precond_init_scale`, `mask`, `seed`, `update_global_norm_clip`, ...). Update
        clipping is off by default, as in psgd_jax.

    **Returns:** an `optax.GradientTransformationExtraArgs`; pass `Hvp=`, `vector=`,
    `update_preconditioner=` to `update` for Newton fitting (see
    [`psgd_eqx.hessian_helper`][]).
    """
    geometry = canonical_geometry(geometry)
    return _flat_alias(
        lambda shape, dt: XMatQ.init(shape, dt, geometry=geometry),
        learning_rate, per_leaf, precond_dtype, _PSGD_JAX_DEFAULTS, kwargs,
    )


def lra(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    rank: int = 10,
    per_leaf: bool = False,
    precond_dtype=None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with the low-rank-approximation preconditioner [`psgd_eqx.LRAQ`][]
    (psgd_jax's `low_rank_approximation`, the reference's `LRAWhiten`/`LRANewton`).

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    - `rank`: r of Q = (I + UVᵀ)diag(d) (psgd_jax's `uvd_rank_of_approximation`, also
        accepted); memory n·(2r + 1). Capped at n − 1 for small parameters.
    - `per_leaf`: one preconditioner per leaf instead of one over all leaves.
    - `precond_dtype`: storage dtype (real).
    - `**kwargs`: as [`psgd_eqx.xmat`][].

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    legacy_rank = kwargs.pop("uvd_rank_of_approximation", None)
    rank = init_int("rank", rank if legacy_rank is None else legacy_rank, 0)
    counter = iter(range(1 << 30))
    seed = kwargs.get("key")
    seed = kwargs.get("seed") if seed is None else seed

    def make(shape, dt):
        n = int(np.prod(shape))
        # U's random start: from the optimizer's key, distinct per leaf (a separate stream
        # from the probes, which split the same key). Only called at `init`, where an
        # inject_hyperparams key is concrete.
        base = as_key(42 if seed is None else seed)
        k = jax.random.fold_in(jax.random.fold_in(base, 0x4C5241), next(counter))
        return LRAQ.init(shape, dt, rank=min(rank, max(n - 1, 0)), key=k)

    return _flat_alias(make, learning_rate, per_leaf, precond_dtype, _PSGD_JAX_DEFAULTS, kwargs)


def dense(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    geometry: str = "PRO",
    per_leaf: bool = False,
    precond_dtype=None,
    max_size: int = 32768,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with one dense [`psgd_eqx.DenseQ`][] over all parameters (the reference's
    `DenseNewton`, a BFGS alternative for up to ~10⁴ parameters), or one per leaf.

    **Arguments:**

    - `learning_rate`: a float or schedule (the reference's 0.01; 1.0 with Newton fitting
        on smooth problems).
    - `geometry`: any of [`psgd_eqx.GEOMETRIES`][] (default `"PRO"`, the reference's).
    - `per_leaf`: one preconditioner per leaf instead of one over all leaves.
    - `precond_dtype`: storage dtype.
    - `max_size`: the largest n for which a Q is built (n² floats: 4 GiB in f32 at the
        default 32,768); `init` raises `ValueError` beyond it rather than allocating.
    - `**kwargs`: as [`psgd_eqx.xmat`][]; clipping is off by default (the reference's
        `grad_clip_max_norm=inf`).

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(geometry)
    max_size = init_int("max_size", max_size, 1)

    def make(shape, dt):
        n = int(np.prod(shape))
        if n > max_size:
            raise ValueError(
                f"`dense` would build a {n}×{n} Q ({n * n * jnp.dtype(dt).itemsize:,} bytes), "
                f"more than `max_size`={max_size}; use `lra`, `kron` or `per_leaf=True`, or "
                "raise `max_size`."
            )
        return DenseQ.init(shape, dt, geometry=geometry)

    return _flat_alias(
        make,
        learning_rate, per_leaf, precond_dtype, _PSGD_JAX_DEFAULTS, kwargs,
    )


def affine(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    max_size_triangular: float = 4096,
    max_skew_triangular: float = 128,
    geometry: str = "PRO",
    precond_dtype=None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with an affine (left ⊗ right) preconditioner per leaf, [`psgd_eqx.AffineQ`][]
    (psgd_jax's `affine`).

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    - `max_size_triangular`, `max_skew_triangular`: a side is diagonal when longer than
        `max_size_triangular` or `max_skew_triangular` times the other (psgd_jax's 4096,
        128; set both to 0 for an all-diagonal preconditioner).
    - `geometry`: any of [`psgd_eqx.GEOMETRIES`][] (`"EQ"` is psgd_jax's rule).
    - `precond_dtype`: storage dtype.
    - `**kwargs`: as [`psgd_eqx.xmat`][].

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(geometry)
    # inject_hyperparams passes arrays (traced in `update`, where the rules are unused)
    size, skew = (concrete(x) if hasattr(x, "dtype") else x
                  for x in (max_size_triangular, max_skew_triangular))
    if size is not None and skew is not None:
        affine_dense_sides((2, 2), size, skew)  # validates
    return _flat_alias(
        lambda shape, dt: AffineQ.init(
            shape, dt, max_size_triangular=size, max_skew_triangular=skew, geometry=geometry,
        ),
        learning_rate, True, precond_dtype, _PSGD_JAX_DEFAULTS, kwargs,
    )


def diag(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    *,
    geometry: str = "PRO",
    precond_dtype=None,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with an element-wise diagonal [`psgd_eqx.DiagQ`][] per leaf: Adam's memory,
    a Lie-group fit of the inverse 4th root of E[g²] instead of an EMA.

    **Arguments:**

    - `learning_rate`: a float or schedule (1e-3, as `kron`: whitening gives Adam's scale).
    - `geometry`: `"PRO"` (any geometry but `QUAD`/`QUAD4P` gives the same diagonal step).
    - `precond_dtype`: storage dtype.
    - `**kwargs`: as [`psgd_eqx.psgd`][]; clipping defaults are `kron`'s (RMS 2, element 10).

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(geometry)
    return _flat_alias(
        lambda shape, dt: DiagQ.init(shape, dt, geometry=geometry),
        learning_rate, True, precond_dtype, {}, kwargs,
    )


# -- explicit signatures for the **kwargs aliases ---------------------------------------
#
# `optax.inject_hyperparams` binds the factory's signature and passes every parameter by
# name; a bare `**kwargs` would reach us as one argument called "kwargs". The aliases
# therefore advertise the full keyword set of `psgd`/`scale_by_psgd` (with their own
# defaults) plus psgd_jax's legacy names, without repeating it in the source.


def _advertise_signature(fn, defaults: dict, legacy: tuple[str, ...] = ()):
    own = [
        p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD
    ]
    names = {p.name for p in own}
    extra = []
    for source in (psgd, scale_by_psgd):
        for p in inspect.signature(source).parameters.values():
            if p.kind != p.KEYWORD_ONLY or p.name in names:
                continue
            if p.name in ("structure", "global_structure"):
                continue
            extra.append(p.replace(default=defaults.get(p.name, p.default)))
            names.add(p.name)
    old_names = (*_RENAMED, *_FIXED_LEGACY, "mask", *legacy)
    extra += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in old_names
    ]
    fn.__signature__ = inspect.signature(fn).replace(parameters=own + extra)
    return fn


for _fn, _defaults, _legacy in (
    (xmat, _PSGD_JAX_DEFAULTS, ()),
    (lra, _PSGD_JAX_DEFAULTS, ("uvd_rank_of_approximation",)),
    (dense, _PSGD_JAX_DEFAULTS, ()),
    (affine, _PSGD_JAX_DEFAULTS, ()),
    (diag, {}, ()),
):
    _advertise_signature(_fn, _defaults, _legacy)


def get_opt_state_partition_specs(
    params: PyTree,
    scale_by_kron_only: bool = False,
    *,
    mesh=None,
    **kwargs: Any,
) -> PyTree[PartitionSpec]:
    """The `PartitionSpec` tree of `kron(**kwargs).init(params)` (distributed_kron's helper).

    **Arguments:**

    - `params`: the params (arrays or `jax.ShapeDtypeStruct`s).
    - `scale_by_kron_only`: the state of `scale_by_kron(**kwargs)` instead of `kron`.
    - `mesh`: the `Mesh` the state will live on (or `None` to use the one set with
        `jax.set_mesh`). It lets the rules check divisibility and spread the factors of
        unsharded axes over the mesh; without any mesh, factors only reuse their
        parameter axis' placement.
    - `**kwargs`: the keywords given to [`psgd_eqx.kron`][], including
        `params_partition_specs` (default: read from the params' shardings) and
        `preconditioner_partition_spec`.

    **Returns:** a tree with the structure of the optimizer state whose leaves are
    `PartitionSpec`s; map it to `NamedSharding(mesh, spec)` for `jax.jit`'s
    `out_shardings`/`in_shardings`.

    !!! Example

        ```python
        kw = dict(learning_rate=3e-4, params_partition_specs=param_specs)
        opt = psgd_eqx.kron(**kw)
        specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                 is_leaf=lambda x: isinstance(x, PartitionSpec))
        state = jax.jit(opt.init, out_shardings=shardings)(params)
        ```
    """
    factory = scale_by_kron if scale_by_kron_only else kron
    accepted = inspect.signature(factory).parameters
    opt = factory(**{k: v for k, v in kwargs.items() if k in accepted})
    shapes = jax.eval_shape(opt.init, params)
    return state_partition_specs(
        shapes,
        params,
        kwargs.get("params_partition_specs"),
        mesh=mesh,
        preconditioner_partition_spec=kwargs.get("preconditioner_partition_spec"),
    )
