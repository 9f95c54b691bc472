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
"""

import math

import jax
from jax.sharding import PartitionSpec as P
from jaxtyping import PyTree

from ._precond import AbstractPrecond, BlockedQ, KronQ, StackedQ
from ._transform import PSGDState


def _is_spec(x) -> bool:
    return x is None or isinstance(x, P)


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
    """For each factor axis (squeezed, maybe merged), the parameter axes it covers."""
    kept = [i for i, n in enumerate(shape) if n != 1] or [0]
    groups, j = [], 0
    for n in axes:
        group, prod = [], 1
        while j < len(kept) and (prod < n or not group):
            prod *= shape[kept[j]]
            group.append(kept[j] + offset)
            j += 1
        groups.append(tuple(group))
    return groups


def _kron_specs(
    q: KronQ,
    param_entries: list[tuple[str, ...]],
    groups: list[tuple[int, ...]],
    batch: list[tuple[str, ...]],
    builder: _Builder,
    precond_spec: P | None,
    skip: tuple[int, ...] = (),
) -> KronQ:
    """A KronQ-shaped tree of specs; `batch` are the wanted axes of leading stack dims.

    Without mesh sizes a dense factor of an unsharded axis stays replicated (spreading it
    over other mesh axes needs their sizes to check divisibility).
    """
    everywhere = ()
    if builder.sizes is not None:
        everywhere = tuple(dict.fromkeys(n for e in param_entries for n in e))
    specs = []
    for i, (f, d) in enumerate(zip(q.factors, q.dense)):
        own = () if i in skip else tuple(n for a in groups[i] for n in param_entries[a])
        if d:
            if precond_spec is not None:
                rows, cols = _spec_entries(precond_spec, 2)
            else:
                rows, cols = (own or everywhere), ()
            wanted = [*batch, rows, cols]
        else:
            wanted = [*batch, own]
        specs.append(builder.spec(f.shape, wanted))
    lip = builder.spec(q.lipschitz.shape, [*batch, ()])
    cache = None
    if q.cache is not None:
        cache = tuple(None if c is None else s for c, s in zip(q.cache, specs))
    leaves = list(specs) + [lip] + ([] if cache is None else [c for c in cache if c is not None])
    return jax.tree.unflatten(jax.tree.structure(q), leaves)


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
    """
    builder = _Builder(_mesh_sizes(mesh))
    entries = _spec_entries(param_spec, len(param_shape))

    def kron(k: KronQ, layer_shape, offset, batch):
        groups = _axis_groups(layer_shape, k.axes_shape, offset)
        return _kron_specs(k, entries, groups, batch, builder, preconditioner_partition_spec)

    def blocked(b: BlockedQ, layer_shape, offset, batch):
        # a stack of blocks takes the placement of the axes that were cut
        cut = tuple(i for i, p in enumerate(b.pieces) if p != ((1, b.axes[i]),))
        groups = _axis_groups(layer_shape, b.axes, offset)
        block_axes = tuple(n for i in cut for a in groups[i] for n in entries[a])
        out = [
            _kron_specs(g, entries, groups, [*batch, block_axes], builder,
                        preconditioner_partition_spec, skip=cut)
            for g in b.groups
        ]
        return jax.tree.unflatten(jax.tree.structure(b), jax.tree.leaves(out, is_leaf=_is_p))

    if isinstance(q, StackedQ):
        layer = tuple(param_shape[1:])
        if isinstance(q.inner, KronQ):
            inner = kron(q.inner, layer, 1, [entries[0]])
        elif isinstance(q.inner, BlockedQ):
            inner = blocked(q.inner, layer, 1, [entries[0]])
        else:
            inner = _generic(q.inner, param_shape, entries, builder, preconditioner_partition_spec)
        return jax.tree.unflatten(jax.tree.structure(q), jax.tree.leaves(inner, is_leaf=_is_p))
    if isinstance(q, KronQ):
        return kron(q, tuple(param_shape), 0, [])
    if isinstance(q, BlockedQ):
        return blocked(q, tuple(param_shape), 0, [])
    return _generic(q, param_shape, entries, builder, preconditioner_partition_spec)


def _generic(q, param_shape, entries, builder, precond_spec):
    """Other structures: arrays shaped like the parameter follow it; matrices follow
    `preconditioner_partition_spec` if given; everything else is replicated."""

    def one(x):
        if tuple(x.shape) == tuple(param_shape):
            return builder.spec(x.shape, entries)
        if x.ndim >= 2 and precond_spec is not None:
            return builder.spec(x.shape, [()] * (x.ndim - 2) + _spec_entries(precond_spec, 2))
        return P()

    return jax.tree.map(one, q)


def _params_specs(params, params_partition_specs):
    """The params' specs: given, or read from the params' own `NamedSharding`s."""
    if params_partition_specs is not None:
        return params_partition_specs

    def read(p):
        sharding = getattr(p, "sharding", None)
        return getattr(sharding, "spec", P())

    return jax.tree.map(read, params)


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
    """
    pspecs = _params_specs(params, params_partition_specs)
    p_leaves, p_def = jax.tree.flatten(params)
    s_leaves = p_def.flatten_up_to(pspecs)
    builder = _Builder(_mesh_sizes(mesh))

    def like_params(tree):
        leaves = p_def.flatten_up_to(tree)
        return p_def.unflatten([
            None if x is None else builder.spec(x.shape, _spec_entries(s, x.ndim))
            for x, s in zip(leaves, s_leaves)
        ])

    def one_state(st):
        if not isinstance(st, PSGDState):
            return jax.tree.map(lambda _: P(), st)
        qs = p_def.flatten_up_to(st.precond)
        precond = p_def.unflatten([
            None if q is None else precond_partition_specs(
                q, p.shape, s, mesh=mesh,
                preconditioner_partition_spec=preconditioner_partition_spec,
            )
            for q, p, s in zip(qs, p_leaves, s_leaves)
        ])
        glob = None
        if st.global_precond is not None:
            glob = jax.tree.map(lambda _: P(), st.global_precond)
        fit = None
        if st.fit_accum is not None:
            fit = (like_params(st.fit_accum[0]), P())
        parts = [P(), P(), None if st.mu is None else like_params(st.mu), precond, P(), P(),
                 glob, fit]
        leaves = jax.tree.leaves(parts, is_leaf=_is_spec)
        leaves = [x for x in leaves if x is not None]
        return jax.tree.unflatten(jax.tree.structure(st), leaves)

    return jax.tree.map(one_state, state, is_leaf=lambda x: isinstance(x, PSGDState))
