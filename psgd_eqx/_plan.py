"""Per-leaf structure rules: which axes of a Kron preconditioner are dense, from shapes alone.

The names are the seeds' (psgd_jax / kron_torch / psgdax / the reference), so users can
bring their settings over:

- `max_size_triangular`: axes longer than this get a diagonal factor;
- `min_ndim_triangular`: tensors with fewer (squeezed) axes get only diagonal factors;
- `max_skew_triangular`: axis i is diagonal when nᵢ² > max_skew · N (the reference's
  `preconditioner_max_skew`; N = number of elements), which caps each dense factor at the
  size of the parameter itself;
- `memory_save_mode`: `None`, `"one_diag"` (the largest axis diagonal),
  `"smart_one_diag"` (the largest axis diagonal only if strictly larger than the second),
  `"one_triu"` (only the smallest axis may be dense), `"all_diag"`.

Size-1 axes are squeezed before any rule is applied (a `(1, 64)` bias is a vector).
"""

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PyTree

from ._build import as_leaf_array, gets_precond
from ._geometry import canonical_geometry
from ._misc import concrete
from ._numerics import compute_dtype, real_dtype, storage_dtype
from ._options import KRON, KRON_PLAN, Options, select, takes
from ._shapes import block_pieces, squeezed_shape


def scanned_predicate(scanned_layers) -> "Callable[[Any, Any], bool]":
    """Normalise `scanned_layers` to a function `(path, leaf) -> bool`.

    **Arguments:**

    - `scanned_layers`: `None` (nothing is scanned), a callable `(path, leaf) -> bool`, or
        a pytree of bools with the params' structure (psgd_jax / distributed_kron): `True`
        marks a leaf whose leading axis stacks layers.

    **Returns:** the predicate.
    """
    if scanned_layers is None:
        return lambda path, leaf: False
    if hasattr(scanned_layers, "dtype"):
        # What `optax.inject_hyperparams` passes for a callable it took for a schedule.
        raise ValueError(
            f"`scanned_layers` must be a pytree of bools like the params or a callable "
            f"`(path, leaf) -> bool`; got an array ({scanned_layers!r}). Under "
            "`optax.inject_hyperparams` every callable argument is taken for a schedule of "
            "the step count, and an `eqx.Module` of bools is callable (its `__call__`): "
            "pass `static_args=(\"scanned_layers\",)`, or a dict of bools."
        )
    # A bools-tree of an Equinox model is itself callable (eqx.nn.Linear(...)): only a
    # callable that is not a Module is a predicate.
    if callable(scanned_layers) and not isinstance(scanned_layers, eqx.Module):
        return lambda path, leaf: bool(scanned_layers(path, leaf))
    flags = {}
    for path, flag in jax.tree_util.tree_flatten_with_path(scanned_layers)[0]:
        if not _is_flag(flag):
            raise TypeError(
                "`scanned_layers` must be a pytree of bools like the params or a callable "
                f"`(path, leaf) -> bool`; got {flag!r} at {jax.tree_util.keystr(path)}."
            )
        flags[jax.tree_util.keystr(path)] = bool(flag)
    return lambda path, leaf: flags.get(jax.tree_util.keystr(path), False)


def _is_flag(x) -> bool:
    """A Python or NumPy bool, or a concrete 0-d bool array: one entry of a
    `scanned_layers` tree."""
    if isinstance(x, (bool, np.bool_)):
        return True
    return (hasattr(x, "dtype") and jnp.dtype(x.dtype) == jnp.bool_ and jnp.ndim(x) == 0
            and concrete(x) is not None)


STRUCTURE_RULES = (
    "max_size_triangular", "min_ndim_triangular", "max_skew_triangular", "memory_save_mode"
)


def validate_structure_rules(
    max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode
) -> None:
    """Raise `ValueError` naming the argument for an invalid structure rule (the checks of
    the option list; traced values are skipped, the rules are only read at `init`)."""
    values = dict(zip(STRUCTURE_RULES, (max_size_triangular, min_ndim_triangular,
                                        max_skew_triangular, memory_save_mode)))
    for option in select(KRON, STRUCTURE_RULES):
        option.check(option.name, values[option.name])


def dense_axes(
    shape: tuple[int, ...],
    *,
    max_size_triangular: ArrayLike = 8192,
    min_ndim_triangular: ArrayLike = 2,
    max_skew_triangular: ArrayLike = float("inf"),
    memory_save_mode: str | None = None,
) -> tuple[bool, ...]:
    """Per axis of `shape` (size-1 axes squeezed): dense (True) or diagonal factor?

    **Arguments:**

    - `shape`: the parameter's shape; size-1 axes are dropped first, and a scalar counts as
        one axis of length 1.
    - `max_size_triangular`: axes longer than this are diagonal.
    - `min_ndim_triangular`: tensors with fewer (squeezed) axes are all diagonal.
    - `max_skew_triangular`: axis i is diagonal when nᵢ² > max_skew · N (N = numel).
    - `memory_save_mode`: `None`, `"one_diag"` (largest axis diagonal),
        `"smart_one_diag"` (largest axis diagonal only if strictly larger than the
        second), `"one_triu"` (only the smallest axis may be dense), `"all_diag"`.

    **Returns:** one flag per squeezed axis.
    """
    validate_structure_rules(
        max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode
    )
    max_size_triangular, min_ndim_triangular, max_skew_triangular = (
        concrete(x) for x in (max_size_triangular, min_ndim_triangular, max_skew_triangular)
    )
    axes = squeezed_shape(tuple(shape))
    numel = math.prod(axes)
    k = len(axes)
    mode_diag = [False] * k
    if memory_save_mode == "all_diag":
        mode_diag = [True] * k
    elif memory_save_mode == "one_diag":
        mode_diag[max(range(k), key=lambda i: axes[i])] = True
    elif memory_save_mode == "smart_one_diag":
        order = sorted(range(k), key=lambda i: -axes[i])
        if k == 1 or axes[order[0]] > axes[order[1]]:
            mode_diag[order[0]] = True
    elif memory_save_mode == "one_triu":
        smallest = min(range(k), key=lambda i: axes[i])
        mode_diag = [i != smallest for i in range(k)]
    out = []
    for n, md in zip(axes, mode_diag):
        diag = (
            n == 1
            or md
            or n > max_size_triangular
            or k < min_ndim_triangular
            or n * n > max_skew_triangular * numel
        )
        out.append(not diag)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What one parameter leaf gets.

    **Fields:**

    - `shape`: the parameter's shape.
    - `axes`: the shape the factors act on: one layer's squeezed shape, with adjacent axes
        merged if `merge_small_dims` merged them.
    - `factor_kinds`: per axis of `axes`: `"dense"`, `"triangular"` (dense under `EQ`) or
        `"diag"`.
    - `state_bytes`: bytes of preconditioner state (factors, cache, Lipschitz estimates;
        all layers and blocks).
    - `layers`: the number of stacked layers (1 unless the leaf is in `scanned_layers`).
    - `blocks`: `()` if the leaf is not cut into blocks; else per axis of `axes` its
        pieces `((count, size), ...)` (see [`psgd_eqx.BlockedQ`][]).
    - `scanned`: whether the leading axis stacks layers.

    A leaf that gets no preconditioner (an empty one, or an integer or boolean one: `init`
    stores `None` for it) has `axes == factor_kinds == ()` and `state_bytes == 0`.
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    factor_kinds: tuple[str, ...]
    state_bytes: int
    layers: int = 1
    blocks: tuple[tuple[tuple[int, int], ...], ...] = ()
    scanned: bool = False

    @property
    def has_precond(self) -> bool:
        """Whether the leaf gets a preconditioner at all."""
        return bool(self.factor_kinds)

    @property
    def dense(self) -> tuple[bool, ...]:
        """Per axis of `axes`: whether its factor (of every block) is dense."""
        return tuple(k != "diag" for k in self.factor_kinds)

    @property
    def merged(self) -> bool:
        """Whether adjacent axes were merged."""
        layer = self.shape[1:] if self.scanned else self.shape
        return self.has_precond and self.axes != squeezed_shape(layer)

    @property
    def num_blocks(self) -> int:
        """Blocks per layer (1 when not blocked)."""
        return math.prod(sum(c for c, _ in p) for p in self.blocks) if self.blocks else 1

    def describe(self) -> str:
        """The preconditioner in words, e.g. `4 × [3 blocks] dense(≤256) ⊗ diag(768)`."""
        if not self.has_precond:
            return "none"
        parts = []
        for i, (kind, n) in enumerate(zip(self.factor_kinds, self.axes)):
            if self.blocks and self.blocks[i] != ((1, n),):
                n = f"≤{max(s for _, s in self.blocks[i])}"
            parts.append(f"{kind}({n})")
        text = " ⊗ ".join(parts)
        if self.merged:
            text = f"merged {self.axes}: {text}"
        if self.num_blocks > 1:
            text = f"{self.num_blocks} blocks of {text}"
        if self.layers > 1:
            text = f"{self.layers} layers × {text}"
        return text

    def __str__(self) -> str:
        return f"{self.shape} -> {self.describe()}: {self.state_bytes:,} B"


def _groups(axes, blocks):
    """(count, block shape) of each block shape in a leaf."""
    if not blocks:
        return [(1, tuple(axes))]
    return [
        (math.prod(c for c, _ in combo), tuple(s for _, s in combo))
        for combo in itertools.product(*blocks)
    ]


def _factor_entries(axes, dense, blocks=()) -> int:
    """Entries of the factors of one layer (no cache, no Lipschitz state)."""
    return sum(
        count * sum(n * n if d else n for n, d in zip(shape, dense))
        for count, shape in _groups(axes, blocks)
    )


def _plan_bytes(axes, dense, dtype, cache_preconditioner, layers, blocks=()) -> int:
    item = jnp.dtype(dtype).itemsize
    lip = jnp.dtype(real_dtype(compute_dtype(dtype))).itemsize
    nbytes = 0
    for count, shape in _groups(axes, blocks):
        per = len(shape) * lip
        for n, d in zip(shape, dense):
            per += n * n * item * (2 if cache_preconditioner else 1) if d else n * item
        nbytes += count * per
    return nbytes * layers


def _compositions(k: int):
    """Every way to cut k axes into contiguous groups, as tuples of group lengths."""
    for cuts in itertools.product((False, True), repeat=k - 1):
        sizes, run = [], 1
        for cut in cuts:
            if cut:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        yield tuple(sizes)


def merged_axes(axes: tuple[int, ...], target: int, cap: int, rules: dict) -> tuple[int, ...]:
    """`merge_small_dims`: the coarsest merge of adjacent axes that the rules allow.

    A group of axes is merged only if its product is at most `target` and the merged axis
    still gets a dense factor (merging into a diagonal factor would throw away the small
    dense ones); a candidate is kept only if its factors hold at most `cap` entries. Among
    the candidates the one with the fewest axes wins, then the smallest.
    """
    if len(axes) < 2 or len(axes) > 12:
        return axes
    best = (len(axes), _factor_entries(axes, dense_axes(axes, **rules)), axes)
    for sizes in _compositions(len(axes)):
        if len(sizes) == len(axes):
            continue
        merged, i, ok = [], 0, True
        for g in sizes:
            merged.append(math.prod(axes[i : i + g]))
            ok &= g == 1 or merged[-1] <= target
            i += g
        if not ok:
            continue
        merged = tuple(merged)
        dense = dense_axes(merged, **rules)
        if any(g > 1 and not d for g, d in zip(sizes, dense)):
            continue
        entries = _factor_entries(merged, dense)
        if entries <= cap and (len(merged), entries) < best[:2]:
            best = (len(merged), entries, merged)
    return best[2]


def leaf_plan(
    shape: tuple[int, ...],
    dtype=jnp.float32,
    *,
    geometry: str = "PRO",
    cache_preconditioner: bool = False,
    scanned: bool = False,
    dense: tuple[bool, ...] | None = None,
    merge_small_dims: bool = False,
    target_merged_dim_size: int = 4096,
    partition_grads_into_blocks: bool = False,
    block_size: int = 256,
    **rules,
) -> LeafPlan:
    """The plan of one leaf; see [`psgd_eqx.kron_plan`][]."""
    geometry = canonical_geometry(geometry)
    shape = tuple(int(n) for n in shape)
    layer_shape, layers = (shape[1:], shape[0]) if scanned else (shape, 1)
    axes = squeezed_shape(layer_shape)
    # Merging and blocking may never cost more than dense factors on every original axis.
    cap = sum(n * n for n in axes)
    blocks = ()
    if dense is None:
        if merge_small_dims:
            axes = merged_axes(axes, target_merged_dim_size, cap, rules)
        dense = dense_axes(axes, **rules)
        if partition_grads_into_blocks:
            free = dense_axes(axes, **{**rules, "max_size_triangular": float("inf")})
            cut = [not d and f and n > block_size for n, d, f in zip(axes, dense, free)]
            # the largest axes first; an axis stays diagonal if cutting it breaks the cap
            blocked = [False] * len(axes)
            for i in sorted(range(len(axes)), key=lambda i: -axes[i]):
                if not cut[i]:
                    continue
                trial = blocked[:i] + [True] + blocked[i + 1 :]
                pieces = tuple(
                    block_pieces(n, block_size) if b else ((1, n),) for n, b in zip(axes, trial)
                )
                trial_dense = tuple(d or b for d, b in zip(dense, trial))
                if _factor_entries(axes, trial_dense, pieces) <= cap:
                    blocked, blocks, dense = trial, pieces, trial_dense
            dense = tuple(bool(d) for d in dense)
    kinds = tuple(
        ("triangular" if geometry == "EQ" else "dense") if d else "diag" for d in dense
    )
    nbytes = _plan_bytes(axes, dense, dtype, cache_preconditioner, layers, blocks)
    return LeafPlan(shape, axes, kinds, nbytes, layers, blocks, scanned)


def _demote(p: LeafPlan, j: int, dtype, cache: bool) -> LeafPlan:
    """`p` with axis j's factor made diagonal (and that axis no longer cut into blocks)."""
    kinds = p.factor_kinds[:j] + ("diag",) + p.factor_kinds[j + 1 :]
    blocks = p.blocks
    if blocks:
        blocks = blocks[:j] + (((1, p.axes[j]),),) + blocks[j + 1 :]
        if all(b == ((1, n),) for b, n in zip(blocks, p.axes)):
            blocks = ()
    dense = tuple(k != "diag" for k in kinds)
    nbytes = _plan_bytes(p.axes, dense, dtype, cache, p.layers, blocks)
    return dataclasses.replace(p, factor_kinds=kinds, state_bytes=nbytes, blocks=blocks)


def _apply_budget(plans: list[LeafPlan], dtypes, budget: int, cache: bool) -> list[LeafPlan]:
    """Demote the largest dense factors to diagonal until the total fits `budget`."""
    plans = list(plans)

    def total():
        return sum(p.state_bytes for p in plans)

    while total() > budget:
        best = None
        for i, p in enumerate(plans):
            for j, kind in enumerate(p.factor_kinds):
                if kind != "diag":
                    demoted = _demote(p, j, dtypes[i], cache)
                    saved = p.state_bytes - demoted.state_bytes
                    if best is None or saved > best[0]:
                        best = (saved, i, demoted)
        if best is None:
            raise ValueError(
                f"`memory_budget_bytes`={budget:,} is below the all-diagonal preconditioner "
                f"state ({total():,} bytes)."
            )
        _, i, demoted = best
        plans[i] = demoted
    return plans


def plan_table(plan: PyTree) -> str:
    """A Markdown table of a [`psgd_eqx.kron_plan`][]: one row per leaf, then the total.

    **Arguments:**

    - `plan`: the pytree of `LeafPlan`s returned by `kron_plan`.

    **Returns:** the table as a string (print it).
    """
    rows = ["| leaf | shape | preconditioner | state bytes |", "|---|---|---|---|"]
    flat = jax.tree_util.tree_flatten_with_path(
        plan, is_leaf=lambda x: isinstance(x, LeafPlan)
    )[0]
    total = 0
    for path, p in flat:
        rows.append(
            f"| `{jax.tree_util.keystr(path)}` | {p.shape} | {p.describe()} | "
            f"{p.state_bytes:,} |"
        )
        total += p.state_bytes
    rows.append(f"| **total** | | | **{total:,}** |")
    return "\n".join(rows)


_PARAMS = (inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),)


@takes(select(KRON, KRON_PLAN), leading=_PARAMS)
def kron_plan(o: Options) -> PyTree[LeafPlan]:
    """The per-leaf preconditioner plan `kron(...)` would build, from shapes alone.

    Nothing is printed by the optimizers; call this (and [`psgd_eqx.plan_table`][]) to
    see what each parameter gets.

    **Arguments:**

    - `params`: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    {options}

    Merging and blocking never give a leaf factors with more entries than dense factors on
    each of its original (squeezed) axes would have, Σᵢ nᵢ²: a merge or a cut that
    would is not made. A (64, 32) weight therefore never gets more than 64² + 32² entries.

    **Returns:** a pytree with the structure of `params` whose leaves are `LeafPlan`s
    (`shape`, `axes`, `factor_kinds`, `state_bytes`, `layers`; `str(plan)` gives one
    readable line). An empty leaf, or an integer or boolean one, gets no preconditioner:
    its plan has `factor_kinds == ()` and `state_bytes == 0`.

    !!! Example

        ```python
        plan = psgd_eqx.kron_plan({"w": jnp.zeros((768, 3072)), "b": jnp.zeros(3072)},
                                  max_skew_triangular=1.0)
        print(psgd_eqx.plan_table(plan))
        ```
    """
    rules = {name: o[name] for name in STRUCTURE_RULES}
    is_scanned = scanned_predicate(o.scanned_layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(o.params)
    leaves = [as_leaf_array(p) for _, p in flat]
    dtypes = [storage_dtype(p.dtype, o.precond_dtype) if gets_precond(p) else None
              for p in leaves]
    plans = [
        leaf_plan(
            p.shape,
            dtype,
            geometry=o.geometry,
            cache_preconditioner=o.cache_preconditioner,
            scanned=is_scanned(path, p),
            merge_small_dims=o.merge_small_dims,
            target_merged_dim_size=o.target_merged_dim_size,
            partition_grads_into_blocks=o.partition_grads_into_blocks,
            block_size=o.block_size,
            **rules,
        )
        # `init` gives such a leaf `None` (the rule of `_build.gets_precond`)
        if dtype is not None else LeafPlan(tuple(int(n) for n in p.shape), (), (), 0)
        for (path, _), p, dtype in zip(flat, leaves, dtypes)
    ]
    if o.memory_budget_bytes is not None:
        plans = _apply_budget(plans, dtypes, int(o.memory_budget_bytes), o.cache_preconditioner)
    return jax.tree_util.tree_unflatten(treedef, plans)
