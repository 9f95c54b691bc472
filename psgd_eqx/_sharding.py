"""Partition specs for the optimizer state, from the params' partition specs.

JAX's SPMD partitioner does the distributed work: the user jits `init`/`update` with
`NamedSharding`s built from these specs, and XLA shards every computation accordingly. The
rules here only decide where each state array lives:

- momentum and accumulators: exactly like their parameter;
- a Kron factor of parameter axis i: rows sharded like axis i; if that axis is not
  sharded, rows sharded over the mesh axes the parameter uses elsewhere (so an FSDP
  weight's unsharded side does not leave an n×n factor on every device); with
  `preconditioner_partition_spec` (distributed_kron's option) that spec for every dense
  factor instead;
- a stack of layers (`StackedQ`) keeps the layer axis' sharding, a stack of blocks
  (`BlockedQ`) is sharded like the axis that was cut;
- a mesh axis is used at most once per array, and only where it divides the dimension
  (jax rejects uneven shardings); scalars, keys and Lipschitz estimates are replicated.

How the spec trees are built: each preconditioner structure has a rule, registered by type
on the single-dispatch function `partition_spec_rule` (so the structures never import this
module). A rule is a table `{field name: rule}` applied by `specs_by_field`, which returns
the same Module type with specs in place of arrays, field by field *by name*: a field
without a rule is an error, never a silently shifted tree. `PSGDState` is built the same way
from its own table.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ._layout import LeafBuckets, stack_specs
from ._precond import (
    LRAQ,
    AbstractPrecond,
    AffineQ,
    BlockedQ,
    DenseQ,
    DiagQ,
    KronQ,
    StackedQ,
    XMatQ,
)
from ._transform import PSGDState


def _is_p(x) -> bool:
    return isinstance(x, P)


def _mesh_sizes(mesh) -> dict[str, int] | None:
    """Mesh axis name -> size, from a `Mesh`/`AbstractMesh`, or the one in context."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return None
    return dict(mesh.shape)


def _names(entry) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _spec_entries(spec, ndim: int) -> list[tuple[str, ...]]:
    spec = P() if spec is None else spec
    entries = [_names(e) for e in tuple(spec)]
    return entries + [()] * (ndim - len(entries))


class _Builder:
    """Assigns mesh axes to the dimensions of one array, left to right."""

    def __init__(self, sizes: dict[str, int] | None):
        self.sizes = sizes

    def spec(self, shape: tuple[int, ...], wanted: list[tuple[str, ...]]) -> P:
        used: set[str] = set()
        out = []
        for n, names in zip(shape, wanted):
            keep = []
            for name in names:
                if name in used:
                    continue
                if self.sizes is not None:
                    if name not in self.sizes:
                        continue
                    if n % (math.prod(self.sizes[a] for a in keep) * self.sizes[name]):
                        continue
                keep.append(name)
            used.update(keep)
            out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
        while out and out[-1] is None:
            out.pop()
        return P(*out)


def _axis_groups(shape: tuple[int, ...], axes: tuple[int, ...], offset: int):
    """For each factor axis (squeezed, maybe merged), the parameter axes it covers.

    An all-ones shape's single factor covers axis 0; a scalar's covers none (there is no
    axis 0 to read a placement from, so its 1×1 factor is replicated).
    """
    kept = [i for i, n in enumerate(shape) if n != 1] or [0][: len(shape)]
    groups, j = [], 0
    for n in axes:
        group, prod = [], 1
        while j < len(kept) and (prod < n or not group):
            prod *= shape[kept[j]]
            group.append(kept[j] + offset)
            j += 1
        groups.append(tuple(group))
    return groups


@dataclasses.dataclass(frozen=True)
class SpecContext:
    """Where one preconditioner structure sits in its parameter; what a rule reads.

    **Fields:**

    - `param_shape`: the full parameter's shape.
    - `entries`: per parameter axis, the mesh axis names of its `PartitionSpec`.
    - `builder`: turns (array shape, wanted mesh axes per dimension) into a valid spec
        (`builder.spec`): each mesh axis used once, only where it divides the dimension.
    - `precond_spec`: `preconditioner_partition_spec` (or `None`).
    - `layer_shape`: the parameter axes the structure acts on (without stack axes).
    - `offset`: how many leading parameter axes are stack axes (not in `layer_shape`).
    - `batch`: the wanted mesh axes of the leading stack dimensions of every array of
        the structure (one per `StackedQ` layer axis or `BlockedQ` block axis above it).
    - `groups`: per factor axis, the parameter axes it covers, when a parent fixes them
        (`BlockedQ`); `None` = the structure derives them from its own axes.
    - `skip`: factor axes whose parameter axes were cut into blocks (their sharding went
        to the block axis, so the factor must not reuse it).
    """

    param_shape: tuple[int, ...]
    entries: tuple[tuple[str, ...], ...]
    builder: _Builder
    precond_spec: P | None
    layer_shape: tuple[int, ...]
    offset: int = 0
    batch: tuple[tuple[str, ...], ...] = ()
    groups: tuple[tuple[int, ...], ...] | None = None
    skip: tuple[int, ...] = ()

    def spec(self, shape: tuple[int, ...], wanted) -> P:
        return self.builder.spec(tuple(shape), list(wanted))


# A field rule: (the field's value, the module, a context) -> that field's spec subtree.
FieldRule = Callable[[Any, Any, Any], Any]


def _dynamic_fields(module) -> list[str]:
    return [f.name for f in dataclasses.fields(module) if not f.metadata.get("static", False)]


def specs_by_field(module: Any, rules: Mapping[str, FieldRule], ctx: Any) -> Any:
    """The spec tree of a Module, built field by field by name.

    **Arguments:**

    - `module`: an `eqx.Module` (a preconditioner or a [`psgd_eqx.PSGDState`][]).
    - `rules`: `{field name: rule}` for every non-static field; `rule(value, module, ctx)`
        returns that field's spec subtree. A field holding `None` stays `None`.
    - `ctx`: passed to every rule (a [`SpecContext`][] for preconditioners).

    **Returns:** a Module of the same type, static fields unchanged, each array field
    replaced by its spec subtree.

    **Raises:** `TypeError` naming the class and the field if a non-static field has no
    rule, or a rule names a field the class does not have: the table no longer matches the
    class (a new or renamed field), and guessing would shift specs onto the wrong arrays.
    """
    cls = type(module)
    names = _dynamic_fields(module)
    missing = [n for n in names if n not in rules]
    if missing:
        raise TypeError(
            f"No partition-spec rule for field(s) {missing} of `{cls.__name__}` (rules for "
            f"{sorted(rules)}); register one with `psgd_eqx._sharding.partition_spec_rule`."
        )
    stale = sorted(set(rules) - set(names))
    if stale:
        raise TypeError(
            f"Partition-spec rules for field(s) {stale} that `{cls.__name__}` does not have."
        )
    # The same Module type with specs in place of arrays. `__init__` is bypassed (as in
    # equinox's own unflatten): `__check_init__` would reject specs where arrays belong.
    out = object.__new__(cls)
    for f in dataclasses.fields(module):
        value = getattr(module, f.name)
        if f.name in rules and value is not None:
            value = rules[f.name](value, module, ctx)
        object.__setattr__(out, f.name, value)
    return out


def _check_aligned(tree, specs) -> None:
    """A rule that returns the wrong number of specs for a field is caught here."""
    want = jax.tree.structure(tree)
    got = jax.tree.structure(specs, is_leaf=_is_p)
    if want != got:
        raise TypeError(
            f"Partition specs of `{type(tree).__name__}` do not match its structure:\n"
            f"  tree:  {want}\n  specs: {got}"
        )


# ---------------------------------------------------------------------------- rules


@functools.singledispatch
def partition_spec_rule(q: Any, ctx: SpecContext) -> PyTree[P]:
    """The spec tree of one preconditioner structure; extend with `.register(cls)`.

    **Arguments:**

    - `q`: the structure (arrays or `jax.ShapeDtypeStruct`s).
    - `ctx`: a [`SpecContext`][]: the parameter's specs and where `q` sits in it.

    **Returns:** a tree with the structure of `q` whose leaves are `PartitionSpec`s;
    registered rules usually return `specs_by_field(q, {field: rule, ...}, ctx)`, and
    recurse into inner structures through `partition_spec_rule` itself.
    """
    raise TypeError(f"Not a preconditioner structure: `{type(q).__name__}`.")


def leafwise_specs(tree: PyTree, ctx: SpecContext) -> PyTree[P]:
    """The generic rule, per array: shaped like the parameter -> like it; a matrix with
    `preconditioner_partition_spec` -> that spec on its last two axes; else replicated.

    It compares with the *full* parameter shape even inside a `StackedQ`, where a stacked
    diagonal `(L, *s)` is exactly the parameter's shape (and so keeps the layer axis).
    """

    def one(x):
        if tuple(x.shape) == tuple(ctx.param_shape):
            return ctx.spec(x.shape, ctx.entries)
        if x.ndim >= 2 and ctx.precond_spec is not None:
            return ctx.spec(x.shape, [()] * (x.ndim - 2) + _spec_entries(ctx.precond_spec, 2))
        return P()

    return jax.tree.map(one, tree)


def _generic(value, q, ctx):
    return leafwise_specs(value, ctx)


def _dispatch(value, q, ctx):
    return partition_spec_rule(value, ctx)


def _replicated(value, *_):
    return jax.tree.map(lambda _: P(), value)


def _table_rule(rules: Mapping[str, FieldRule]):
    return lambda q, ctx: specs_by_field(q, rules, ctx)


@partition_spec_rule.register(AbstractPrecond)
def _unregistered(q: AbstractPrecond, ctx: SpecContext) -> PyTree[P]:
    """A structure nobody registered (subclasses of registered ones get their parent's
    rule, whose table then rejects any field it does not know).

    Flat structures get the generic rule on every field: it is per array, so the tree
    cannot misalign, and it only ever shards an array exactly like its parameter or by the
    user's `preconditioner_partition_spec`; at worst an array is replicated (memory, not
    correctness). A structure *wrapping* others is refused instead: the generic rule would
    skip the inner structures' own rules (a wrapped Kron would lose its factor sharding,
    its stack axes would be read as parameter axes) without any sign of it.
    """
    names = _dynamic_fields(q)

    def wraps(value) -> bool:
        inner = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, AbstractPrecond))
        return any(isinstance(x, AbstractPrecond) for x in inner)

    nested = [n for n in names if wraps(getattr(q, n))]
    if nested:
        raise TypeError(
            f"`{type(q).__name__}` wraps other preconditioners (field(s) {nested}) and has no "
            "partition-spec rule; register one with "
            "`psgd_eqx._sharding.partition_spec_rule.register`."
        )
    return specs_by_field(q, dict.fromkeys(names, _generic), ctx)


def _kron_factor_specs(q: KronQ, ctx: SpecContext) -> list[P]:
    """One spec per factor; `ctx.batch` are the wanted axes of leading stack dims.

    Without mesh sizes a dense factor of an unsharded axis stays replicated (spreading it
    over other mesh axes needs their sizes to check divisibility).
    """
    groups = ctx.groups
    if groups is None:
        groups = _axis_groups(ctx.layer_shape, q.axes_shape, ctx.offset)
    everywhere = ()
    if ctx.builder.sizes is not None:
        everywhere = tuple(dict.fromkeys(n for e in ctx.entries for n in e))
    specs = []
    for i, (f, d) in enumerate(zip(q.factors, q.dense)):
        own = () if i in ctx.skip else tuple(n for a in groups[i] for n in ctx.entries[a])
        if d:
            if ctx.precond_spec is not None:
                rows, cols = _spec_entries(ctx.precond_spec, 2)
            else:
                rows, cols = (own or everywhere), ()
            wanted = [*ctx.batch, rows, cols]
        else:
            wanted = [*ctx.batch, own]
        specs.append(ctx.spec(f.shape, wanted))
    return specs


def _kron_cache(value, q, ctx):
    # P_i = Q_iᴴQ_i has Q_i's shape, so it lives where Q_i lives
    return tuple(None if c is None else s for c, s in zip(value, _kron_factor_specs(q, ctx)))


KRON_RULES: dict[str, FieldRule] = {
    "factors": lambda value, q, ctx: tuple(_kron_factor_specs(q, ctx)),
    "lipschitz": lambda value, q, ctx: ctx.spec(value.shape, [*ctx.batch, ()]),
    "cache": _kron_cache,
}


def _stacked_inner(value, q: StackedQ, ctx: SpecContext):
    # the inner arrays carry the layer axis first: it keeps the layer axis' sharding
    inner = dataclasses.replace(
        ctx, layer_shape=ctx.layer_shape[1:], offset=ctx.offset + 1,
        batch=(*ctx.batch, ctx.entries[ctx.offset]), groups=None, skip=(),
    )
    return partition_spec_rule(value, inner)


STACKED_RULES: dict[str, FieldRule] = {"inner": _stacked_inner}


def _blocked_groups(value, b: BlockedQ, ctx: SpecContext):
    # a stack of blocks takes the placement of the axes that were cut
    cut = tuple(i for i, p in enumerate(b.pieces) if p != ((1, b.axes[i]),))
    groups = tuple(_axis_groups(ctx.layer_shape, b.axes, ctx.offset))
    block_axes = tuple(n for i in cut for a in groups[i] for n in ctx.entries[a])
    inner = dataclasses.replace(ctx, batch=(*ctx.batch, block_axes), groups=groups, skip=cut)
    return tuple(partition_spec_rule(g, inner) for g in value)


BLOCKED_RULES: dict[str, FieldRule] = {"groups": _blocked_groups}

# The two-factor KronQ of the matrix view gets the generic rule, as it always has: the Kron
# rule would read its factor axes as parameter axes, which the reshape/transpose breaks.
AFFINE_RULES: dict[str, FieldRule] = {"kron": _generic}

FLAT_RULES: dict[type, dict[str, FieldRule]] = {
    DiagQ: {"d": _generic, "lipschitz": _generic},
    DenseQ: {"q": _generic, "lipschitz": _generic},
    LRAQ: {"u": _generic, "v": _generic, "d": _generic, "lipschitz": _generic},
    # the odd middle element is a DiagQ: its own (generic) rule, in the same context
    XMatQ: {"blocks": _generic, "lipschitz": _generic, "middle": _dispatch},
}

partition_spec_rule.register(KronQ, _table_rule(KRON_RULES))
partition_spec_rule.register(StackedQ, _table_rule(STACKED_RULES))
partition_spec_rule.register(BlockedQ, _table_rule(BLOCKED_RULES))
partition_spec_rule.register(AffineQ, _table_rule(AFFINE_RULES))
for _cls, _rules in FLAT_RULES.items():
    partition_spec_rule.register(_cls, _table_rule(_rules))


# ---------------------------------------------------------------------------- public


def precond_partition_specs(
    q: AbstractPrecond,
    param_shape: tuple[int, ...],
    param_spec: P | None,
    *,
    mesh=None,
    preconditioner_partition_spec: P | None = None,
) -> PyTree[P]:
    """Partition specs for one parameter's preconditioner.

    **Arguments:**

    - `q`: the preconditioner (arrays or `jax.ShapeDtypeStruct`s).
    - `param_shape`: the parameter's shape.
    - `param_spec`: the parameter's `PartitionSpec` (`None` = replicated).
    - `mesh`: a `Mesh`/`AbstractMesh`, or `None` for the one set with `jax.set_mesh`; with
        neither, divisibility is not checked and unsharded sides are not spread.
    - `preconditioner_partition_spec`: one spec for every dense factor (e.g.
        `P("fsdp", None)`), as in distributed_kron; `None` = inferred per factor.

    **Returns:** a tree with the structure of `q` whose leaves are `PartitionSpec`s.

    **Raises:** `TypeError` if `q`'s structure has a field its rule does not know, or wraps
    other structures without a registered rule (see `partition_spec_rule`).
    """
    shape = tuple(int(n) for n in param_shape)
    ctx = SpecContext(
        param_shape=shape,
        entries=tuple(_spec_entries(param_spec, len(shape))),
        builder=_Builder(_mesh_sizes(mesh)),
        precond_spec=preconditioner_partition_spec,
        layer_shape=shape,
    )
    specs = partition_spec_rule(q, ctx)
    _check_aligned(q, specs)
    return specs


def _params_specs(params, params_partition_specs):
    """The params' specs: given, or read from the params' own `NamedSharding`s."""
    if params_partition_specs is not None:
        return params_partition_specs

    def read(p):
        sharding = getattr(p, "sharding", None)
        return getattr(sharding, "spec", P())

    return jax.tree.map(read, params)


@dataclasses.dataclass(frozen=True)
class _StateContext:
    """What the `PSGDState` field rules need: per-parameter trees -> spec trees."""

    like_params: Callable[[PyTree], PyTree[P]]
    precond: Callable[[PyTree], PyTree[P]]


STATE_RULES: dict[str, FieldRule] = {
    "count": _replicated,
    "key": _replicated,
    "mu": lambda value, st, c: c.like_params(value),
    "precond": lambda value, st, c: c.precond(value),
    "refit_accumulator": _replicated,
    "refits": _replicated,
    # one preconditioner over the concatenation of many leaves: no one parameter to follow
    "global_precond": _replicated,
    # (running sum of the fit inputs, their count)
    "fit_accum": lambda value, st, c: (c.like_params(value[0]), _replicated(value[1])),
    # a few scalars per leaf (per layer of a scanned stack), and one scalar
    "diagnostics": _replicated,
    "staleness": _replicated,
}


def _state_context(params, pspecs, mesh, preconditioner_partition_spec) -> _StateContext:
    p_leaves, p_def = jax.tree.flatten(params)
    s_leaves = p_def.flatten_up_to(pspecs)
    builder = _Builder(_mesh_sizes(mesh))

    def like_params(tree):
        leaves = p_def.flatten_up_to(tree)
        return p_def.unflatten([
            None if x is None else builder.spec(x.shape, _spec_entries(s, x.ndim))
            for x, s in zip(leaves, s_leaves)
        ])

    def one(q, i):
        # An entry without arrays (`None`, or the `GlobalSlot` marker of a leaf in the
        # global group) is its own spec tree: nothing to place, so nothing to misplace.
        if not jax.tree.leaves(q):
            return q
        return precond_partition_specs(
            q, p_leaves[i].shape, s_leaves[i], mesh=mesh,
            preconditioner_partition_spec=preconditioner_partition_spec,
        )

    def precond(layout):
        # Stored per bucket (`_layout.py`): each member's specs, merged per stack (the
        # stack axis replicated: every device holds every member's slice).
        if not isinstance(layout, LeafBuckets):
            return layout  # a params tree without leaves: nothing to place
        specs = layout.map_members(one, stack_specs)
        if layout.owner is None:
            return specs
        # owner-computes: a stack is sharded along its (padded) stack axis, each member
        # whole on its owner; a bucket of one keeps its placement
        owned = [jax.tree.map(lambda _: P(layout.owner), stack) if len(idx) > 1 else spec
                 for stack, spec, idx in zip(layout.stacks, specs.stacks, layout.index)]
        return specs.with_stacks(owned)

    return _StateContext(like_params, precond)


def state_partition_specs(
    state: PyTree,
    params: PyTree,
    params_partition_specs: PyTree[P] | None = None,
    *,
    mesh=None,
    preconditioner_partition_spec: P | None = None,
) -> PyTree[P]:
    """Partition specs for an optimizer state that contains [`psgd_eqx.PSGDState`][]s.

    **Arguments:**

    - `state`: the state, or its shapes (`jax.eval_shape(opt.init, params)`).
    - `params`: the params (arrays or `jax.ShapeDtypeStruct`s).
    - `params_partition_specs`: a tree like `params` of `PartitionSpec`s; `None` = read
        each param's `.sharding.spec` (replicated if it has none).
    - `mesh`, `preconditioner_partition_spec`: see
        [`psgd_eqx.get_opt_state_partition_specs`][].

    **Returns:** a tree with the structure of `state` whose leaves are `PartitionSpec`s
    (`None` where the state has `None`).

    **Raises:** `TypeError` if a `PSGDState` (or a subclass) has a field without a rule,
    or a preconditioner cannot be given specs (see
    [`psgd_eqx.precond_partition_specs`][]).
    """
    pspecs = _params_specs(params, params_partition_specs)
    ctx = _state_context(params, pspecs, mesh, preconditioner_partition_spec)

    def one_state(st):
        if not isinstance(st, PSGDState):
            # other transforms' states in the chain (scalars, counts): replicated
            return jax.tree.map(lambda _: P(), st)
        specs = specs_by_field(st, STATE_RULES, ctx)
        _check_aligned(st, specs)
        return specs

    return jax.tree.map(one_state, state, is_leaf=lambda x: isinstance(x, PSGDState))
