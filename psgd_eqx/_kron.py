"""The Kron family: `scale_by_kron`, `kron` and `get_opt_state_partition_specs`.

All three take their options from the one list `_options.KRON` (as does `kron_plan`): the
structure options go to the planner, the transform options to `scale_by_psgd`, and the
plan of each leaf becomes a `KronQ` (or `BlockedQ` of them, or `StackedQ` of either).
"""

import inspect

import jax
import optax
from jax.sharding import PartitionSpec
from jaxtyping import PyTree

from ._eager import eager_cached
from ._numerics import storage_dtype
from ._options import (
    KRON,
    KRON_ALIAS_ONLY,
    KRON_PLAN,
    SCALE_BY_KRON,
    TRANSFORM,
    Options,
    names,
    takes,
)
from ._plan import LeafPlan, kron_plan
from ._precond import BlockedQ, KronQ, StackedQ
from ._sharding import state_partition_specs
from ._transform import scale_by_psgd
from ._weight_decay import with_lr_and_decay


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


def _leaf_precond(lp: LeafPlan, dtype, o: Options):
    """The preconditioner that the plan `lp` of one leaf describes."""

    def kron_q(shape, merged):
        return KronQ.init(shape, dtype, dense=lp.dense, geometry=o.geometry,
                          cache_preconditioner=o.cache_preconditioner, merged=merged,
                          use_kernels=o.use_kernels)

    def one_layer(shape):
        if not lp.blocks:
            return kron_q(shape, lp.axes if lp.merged else None)
        sizes = tuple(None if b == ((1, n),) else o.block_size
                      for b, n in zip(lp.blocks, lp.axes))
        return BlockedQ.init(lambda s: kron_q(s, s), shape, lp.axes, sizes)

    if not lp.scanned:
        return one_layer(lp.shape)
    batch = o.lax_map_batch_size if o.lax_map_scanned_layers else None
    return StackedQ.init(one_layer, lp.shape, map_batch_size=batch)


def _constrain(o: Options, updates, state):
    """Under `jax.set_mesh`, pin the new state and updates to the partition specs."""
    mesh = jax.sharding.get_abstract_mesh()
    wants = o.params_partition_specs is not None or o.preconditioner_partition_spec is not None
    if not wants or mesh is None or mesh.empty:
        return updates, state
    pspecs = o.params_partition_specs
    if pspecs is None:
        pspecs = jax.tree.map(lambda _: PartitionSpec(), updates)
    specs = state_partition_specs(state, updates, pspecs, mesh=mesh,
                                  preconditioner_partition_spec=o.preconditioner_partition_spec)
    state = jax.lax.with_sharding_constraint(state, specs)
    return jax.lax.with_sharding_constraint(updates, pspecs), state


@takes(SCALE_BY_KRON)
@eager_cached
def scale_by_kron(o: Options) -> optax.GradientTransformationExtraArgs:
    """Kronecker-factored PSGD (no learning rate, no weight decay): P·m, clipped.

    Every parameter gets a [`psgd_eqx.KronQ`][]; which axes are dense follows the structure
    rules (see [`psgd_eqx.kron_plan`][]).

    **Arguments:**

    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state contains one
    [`psgd_eqx.PSGDState`][].
    """
    transform = {**o.pick([t for t in TRANSFORM if t.name in o])}
    transform["whiten_grad"] = _fit_target(o.whiten_grad, o.momentum_into_precond_update)
    plan_options = {name: o[name] for name in KRON_PLAN}
    plans: dict = {}  # filled by init_fn from the whole-tree plan, read by `structure`

    def structure(path, p):
        lp = plans[jax.tree_util.keystr(path)]
        return _leaf_precond(lp, storage_dtype(p.dtype, o.precond_dtype), o)

    inner = scale_by_psgd(structure, **transform)

    def init_fn(params):
        flat = jax.tree_util.tree_flatten_with_path(
            kron_plan(params, **plan_options), is_leaf=lambda x: isinstance(x, LeafPlan)
        )[0]
        plans.clear()
        plans.update({jax.tree_util.keystr(path): lp for path, lp in flat})
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra):
        updates, state = inner.update(updates, state, params, **extra)
        return _constrain(o, updates, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@takes(KRON, positional=True)
@eager_cached
def kron(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with Kronecker-factored preconditioners: the drop-in optax optimizer.

    `optax.chain(scale_by_kron(...), add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))`, i.e. θ ← θ − lr·(clip(P·m) + wd·θ), weight
    decay coupled to the lr as in `optax.adamw`. See
    [Learning rates and weight decay](../guides/learning_rates.md) for porting lr/wd from
    Adam and from the other PSGD implementations.

    **Arguments:**

    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.

    !!! Example

        ```python
        opt = psgd_eqx.kron(learning_rate=1e-3)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ```
    """
    scale = scale_by_kron(**o.pick(SCALE_BY_KRON))
    return with_lr_and_decay(scale, o.learning_rate, o.weight_decay, o.weight_decay_mask)


def _factory_kwargs(scale_by_kron_only: bool, kwargs: dict) -> dict:
    """The options to build the optimizer with: any of `kron`'s (a `TypeError` names any
    other); `kron`'s own (lr, weight decay), which do not shape `scale_by_kron`'s state,
    are dropped for `scale_by_kron_only`, so one keyword set serves both."""
    unknown = sorted(set(kwargs) - set(names(KRON)))
    if unknown:
        raise TypeError(f"get_opt_state_partition_specs: {unknown} are not options of kron.")
    if scale_by_kron_only:
        kwargs = {k: v for k, v in kwargs.items() if k not in KRON_ALIAS_ONLY}
    return kwargs


_SPECS_PARAMS = (
    inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("scale_by_kron_only", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      default=False),
    inspect.Parameter("mesh", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
)


@takes((), leading=_SPECS_PARAMS)
def get_opt_state_partition_specs(o: Options) -> PyTree[PartitionSpec]:
    """The `PartitionSpec` tree of `kron(**kwargs).init(params)` (distributed_kron's helper).

    **Arguments:**

    - `params`: the params (arrays or `jax.ShapeDtypeStruct`s).
    - `scale_by_kron_only`: the state of `scale_by_kron(**kwargs)` instead of `kron`.
    - `mesh`: the `Mesh` the state will live on (or `None` to use the one set with
        `jax.set_mesh`). It lets the rules check divisibility and spread the factors of
        unsharded axes over the mesh; without any mesh, factors only reuse their
        parameter axis' placement.
    - `**kwargs`: the options of [`psgd_eqx.kron`][] (a `TypeError` names any other),
        including `params_partition_specs` (default: read from the params' shardings) and
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
    kwargs = _factory_kwargs(o.scale_by_kron_only, o.kwargs)
    factory = scale_by_kron if o.scale_by_kron_only else kron
    mesh = o.mesh
    if mesh is not None and kwargs.get("owner_axes") is not None:
        # owner-computes pads each stack to the size of the owner axes: `init` reads the mesh
        abstract = getattr(mesh, "abstract_mesh", mesh)
        with jax.sharding.use_abstract_mesh(abstract):
            shapes = jax.eval_shape(factory(**kwargs).init, o.params)
    else:
        shapes = jax.eval_shape(factory(**kwargs).init, o.params)
    return state_partition_specs(
        shapes, o.params, kwargs.get("params_partition_specs"), mesh=o.mesh,
        preconditioner_partition_spec=kwargs.get("preconditioner_partition_spec"),
    )
