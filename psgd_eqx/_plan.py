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
import itertools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PyTree

from ._geometry import canonical_geometry
from ._numerics import compute_dtype, real_dtype


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes that get a factor: size-1 axes are dropped; a scalar (or all-ones shape) is
    treated as a length-1 vector with one diagonal factor."""
    sq = tuple(int(n) for n in shape if n != 1)
    if not sq:
        return (1,)
    return sq


def matrix_view(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, int]]:
    """How an affine preconditioner sees a tensor as a matrix (psgd_jax's rule).

    Scalars and vectors become a `(1, n)` row; matrices stay; a higher-order tensor is
    transposed and reshaped to the `(m, k)` matrix with the smallest m² + k² (the memory of
    two dense factors) over all axis orders and split points, the identity order winning
    ties. Tensors of more than 6 axes only try split points of their own order.

    **Arguments:**

    - `shape`: the parameter's shape.

    **Returns:** `(perm, (m, k))`: transpose the tensor by `perm`, then reshape to `(m, k)`.
    """
    shape = tuple(int(n) for n in shape)
    ident = tuple(range(len(shape)))
    if len(shape) < 2:
        return ident, (1, math.prod(shape))
    if len(shape) == 2:
        return ident, (shape[0], shape[1])
    orders = itertools.permutations(ident) if len(shape) <= 6 else [ident]
    best = None
    for perm in orders:
        s = [shape[j] for j in perm]
        for i in range(1, len(s)):
            m, k = math.prod(s[:i]), math.prod(s[i:])
            if best is None or m * m + k * k < best[0]:
                best = (m * m + k * k, tuple(perm), (m, k))
    return best[1], best[2]


def affine_dense_sides(
    matrix_shape: tuple[int, int], max_size_triangular: float, max_skew_triangular: float
) -> tuple[bool, bool]:
    """psgd_jax's affine rule: a side of size s (the other side t) is diagonal when
    s < 2, s > `max_size_triangular` or s > `max_skew_triangular`·t; dense otherwise.

    **Arguments:**

    - `matrix_shape`: `(m, k)` from [`psgd_eqx.matrix_view`][].
    - `max_size_triangular`, `max_skew_triangular`: the rule's thresholds.

    **Returns:** `(left_dense, right_dense)`.
    """
    m, k = matrix_shape
    for name, val in (("max_size_triangular", max_size_triangular),
                      ("max_skew_triangular", max_skew_triangular)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise ValueError(f"`{name}` must be a number >= 0; got {val!r}.")

    def dense(s, t):
        return not (s < 2 or s > max_size_triangular or s > max_skew_triangular * t)

    return dense(m, k), dense(k, m)


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
    # A bools-tree of an Equinox model is itself callable (eqx.nn.Linear(...)): only a
    # callable that is not a Module is a predicate.
    if callable(scanned_layers) and not isinstance(scanned_layers, eqx.Module):
        return lambda path, leaf: bool(scanned_layers(path, leaf))
    flags = {
        jax.tree_util.keystr(path): bool(flag)
        for path, flag in jax.tree_util.tree_flatten_with_path(scanned_layers)[0]
    }
    return lambda path, leaf: flags.get(jax.tree_util.keystr(path), False)


MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")


def validate_structure_rules(
    max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode
) -> None:
    """Raise `ValueError` naming the argument for an invalid structure rule.

    Array values (as `optax.inject_hyperparams` passes them) are read as numbers when
    concrete and skipped when traced (the rules are only used at `init`).
    """
    from ._transform import concrete

    max_size_triangular, min_ndim_triangular, max_skew_triangular = (
        concrete(x) if hasattr(x, "dtype") else x
        for x in (max_size_triangular, min_ndim_triangular, max_skew_triangular)
    )
    if max_size_triangular is None or min_ndim_triangular is None or max_skew_triangular is None:
        return
    if isinstance(min_ndim_triangular, float) and min_ndim_triangular.is_integer():
        min_ndim_triangular = int(min_ndim_triangular)
    if not isinstance(max_size_triangular, (int, float)) or max_size_triangular < 0:
        raise ValueError(
            f"`max_size_triangular` must be a number >= 0; got {max_size_triangular!r}."
        )
    if not isinstance(min_ndim_triangular, int) or min_ndim_triangular < 0:
        raise ValueError(
            f"`min_ndim_triangular` must be an int >= 0; got {min_ndim_triangular!r}."
        )
    if not isinstance(max_skew_triangular, (int, float)) or not max_skew_triangular >= 0:
        raise ValueError(
            f"`max_skew_triangular` must be a number >= 0; got {max_skew_triangular!r}."
        )
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(
            f"`memory_save_mode` must be one of {MEMORY_SAVE_MODES}; got {memory_save_mode!r}."
        )


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
    from ._transform import concrete

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
    - `axes`: the squeezed shape the factors act on (of one layer, for a stacked leaf).
    - `factor_kinds`: per axis `"dense"`, `"triangular"` (dense under `EQ`) or `"diag"`.
    - `state_bytes`: bytes of preconditioner state (factors, cache, Lipschitz estimates;
        all layers of a stacked leaf).
    - `layers`: the number of stacked layers (1 unless the leaf is in `scanned_layers`).
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    factor_kinds: tuple[str, ...]
    state_bytes: int
    layers: int = 1

    def __str__(self) -> str:
        kinds = " ⊗ ".join(f"{k}({n})" for k, n in zip(self.factor_kinds, self.axes))
        stack = f"{self.layers} × " if self.layers > 1 else ""
        return f"{self.shape} -> {stack}{kinds}: {self.state_bytes:,} B"


def _plan_bytes(axes, dense, dtype, cache_preconditioner, layers) -> int:
    item = jnp.dtype(dtype).itemsize
    nbytes = len(axes) * jnp.dtype(real_dtype(compute_dtype(dtype))).itemsize
    for n, d in zip(axes, dense):
        nbytes += n * n * item * (2 if cache_preconditioner else 1) if d else n * item
    return nbytes * layers


def leaf_plan(
    shape: tuple[int, ...],
    dtype=jnp.float32,
    *,
    geometry: str = "PRO",
    cache_preconditioner: bool = False,
    scanned: bool = False,
    dense: tuple[bool, ...] | None = None,
    **rules,
) -> LeafPlan:
    """The plan of one leaf; see [`psgd_eqx.kron_plan`][]."""
    geometry = canonical_geometry(geometry)
    shape = tuple(int(n) for n in shape)
    layer_shape, layers = (shape[1:], shape[0]) if scanned else (shape, 1)
    axes = squeezed_shape(layer_shape)
    if dense is None:
        dense = dense_axes(layer_shape, **rules)
    kinds = tuple(
        ("triangular" if geometry == "EQ" else "dense") if d else "diag" for d in dense
    )
    nbytes = _plan_bytes(axes, dense, dtype, cache_preconditioner, layers)
    return LeafPlan(shape, axes, kinds, nbytes, layers)


def _apply_budget(plans: list[LeafPlan], dtypes, budget: int, cache: bool) -> list[LeafPlan]:
    """Demote the largest dense factors to diagonal until the total fits `budget`."""
    plans = list(plans)

    def total():
        return sum(p.state_bytes for p in plans)

    while total() > budget:
        best = None
        for i, p in enumerate(plans):
            item = jnp.dtype(dtypes[i]).itemsize * (2 if cache else 1)
            for j, (n, kind) in enumerate(zip(p.axes, p.factor_kinds)):
                if kind != "diag":
                    saved = (n * n * item - n * jnp.dtype(dtypes[i]).itemsize) * p.layers
                    if best is None or saved > best[0]:
                        best = (saved, i, j)
        if best is None:
            raise ValueError(
                f"`memory_budget_bytes`={budget:,} is below the all-diagonal preconditioner "
                f"state ({total():,} bytes)."
            )
        _, i, j = best
        p = plans[i]
        kinds = p.factor_kinds[:j] + ("diag",) + p.factor_kinds[j + 1 :]
        dense = tuple(k != "diag" for k in kinds)
        nbytes = _plan_bytes(p.axes, dense, dtypes[i], cache, p.layers)
        plans[i] = dataclasses.replace(p, factor_kinds=kinds, state_bytes=nbytes)
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
        kinds = " ⊗ ".join(f"{k}({n})" for k, n in zip(p.factor_kinds, p.axes))
        stack = f"{p.layers} × " if p.layers > 1 else ""
        rows.append(
            f"| `{jax.tree_util.keystr(path)}` | {p.shape} | {stack}{kinds} | "
            f"{p.state_bytes:,} |"
        )
        total += p.state_bytes
    rows.append(f"| **total** | | | **{total:,}** |")
    return "\n".join(rows)


def kron_plan(
    params: PyTree,
    *,
    max_size_triangular: float = 8192,
    min_ndim_triangular: int = 2,
    max_skew_triangular: float = float("inf"),
    memory_save_mode: str | None = None,
    geometry: str = "PRO",
    precond_dtype=None,
    cache_preconditioner: bool = False,
    scanned_layers: Any = None,
    memory_budget_bytes: ArrayLike | None = None,
) -> PyTree[LeafPlan]:
    """The per-leaf preconditioner plan `kron(...)` would build, from shapes alone.

    Nothing is printed by the optimizers; call this (and [`psgd_eqx.plan_table`][]) to
    see what each parameter gets.

    **Arguments:**

    - `params`: a pytree of arrays or `jax.ShapeDtypeStruct`s.
    - the structure keywords of [`psgd_eqx.kron`][] (same names, same defaults),
        including `scanned_layers` and `memory_budget_bytes` (the largest dense factors
        are demoted to diagonal until the total state fits; `ValueError` if even an
        all-diagonal preconditioner does not).

    **Returns:** a pytree with the structure of `params` whose leaves are `LeafPlan`s
    (`shape`, `axes`, `factor_kinds`, `state_bytes`, `layers`; `str(plan)` gives one
    readable line).

    !!! Example

        ```python
        plan = psgd_eqx.kron_plan({"w": jnp.zeros((768, 3072)), "b": jnp.zeros(3072)},
                                  max_skew_triangular=1.0)
        print(psgd_eqx.plan_table(plan))
        ```
    """
    rules = dict(
        max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular,
        max_skew_triangular=max_skew_triangular,
        memory_save_mode=memory_save_mode,
    )
    is_scanned = scanned_predicate(scanned_layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    dtypes = [
        precond_dtype if precond_dtype is not None else compute_dtype(p.dtype) for _, p in flat
    ]
    plans = [
        leaf_plan(
            p.shape,
            dtype,
            geometry=geometry,
            cache_preconditioner=cache_preconditioner,
            scanned=is_scanned(path, p),
            **rules,
        )
        for (path, p), dtype in zip(flat, dtypes)
    ]
    if hasattr(memory_budget_bytes, "dtype"):  # an array from inject_hyperparams
        from ._transform import concrete

        given = memory_budget_bytes
        memory_budget_bytes = concrete(memory_budget_bytes)
        if memory_budget_bytes is None or not float(memory_budget_bytes).is_integer():
            raise ValueError(f"`memory_budget_bytes` must be a concrete int; got {given!r}.")
        memory_budget_bytes = int(memory_budget_bytes)
    if memory_budget_bytes is not None:
        if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, int) \
                or memory_budget_bytes < 0:
            raise ValueError(
                f"`memory_budget_bytes` must be an int >= 0 or None; got {memory_budget_bytes!r}."
            )
        plans = _apply_budget(plans, dtypes, memory_budget_bytes, cache_preconditioner)
    return jax.tree_util.tree_unflatten(treedef, plans)
