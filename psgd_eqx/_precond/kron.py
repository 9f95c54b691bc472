import math
import string
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .. import _rng
from .._fused import ApplyConfig, Gram, apply_applies, fused_apply, refit_applies
from .._geometry import (
    AbstractContractions,
    GeometrySpec,
    Statistic,
    balance_factors,
    canonical_geometry,
    fit_factor,
    fit_statistics,
    maybe_balance,
)
from .._norms import Normaliser
from .._numerics import abs2, compute_dtype, promote, real_dtype
from .._ops import check_use_kernels, solve_upper_h
from .._shapes import squeezed_shape
from .base import AbstractGeometryPrecond


def _mode_product(m: Array, x: Array, axis: int) -> Array:
    """y = M ×_axis x, i.e. y[..a..] = Σ_b M[a, b] x[..b..]."""
    return jnp.moveaxis(jnp.tensordot(m, x, axes=((1,), (axis,))), 0, axis)


def _mode_scale(d: Array, x: Array, axis: int) -> Array:
    shape = [1] * x.ndim
    shape[axis] = d.shape[0]
    return x * d.reshape(shape)


def _contract(x: Array, y: Array, axis: int) -> Array:
    """T[a, b] = Σ over all other axes of x[..a..] conj(y[..b..])."""
    n = x.shape[axis]
    xm = jnp.moveaxis(x, axis, 0).reshape(n, -1)
    ym = jnp.moveaxis(y, axis, 0).reshape(n, -1)
    return xm @ jnp.conj(ym).T


def _contract_diag(x: Array, axis: int) -> Array:
    """t[a] = Σ over all other axes of |x[..a..]|² (real)."""
    axes = tuple(i for i in range(x.ndim) if i != axis)
    return jnp.sum(abs2(x), axis=axes)


def _apply_einsum(dense: tuple[bool, ...], cached: bool) -> str:
    """One einsum string for P·x: per dense axis either P_i (cached) or Q_iᴴ, Q_i."""
    letters = iter(string.ascii_letters)
    in_sub, out_sub, ops = [], [], []
    for is_dense in dense:
        a = next(letters)
        if not is_dense:
            ops.append(a)
            in_sub.append(a)
            out_sub.append(a)
        elif cached:
            b = next(letters)
            ops.append(b + a)
            in_sub.append(a)
            out_sub.append(b)
        else:
            b, c = next(letters), next(letters)
            ops.extend([c + b, c + a])  # conj(Q)[c, b] · Q[c, a] = (QᴴQ)[b, a]
            in_sub.append(a)
            out_sub.append(b)
    return ",".join(ops) + "," + "".join(in_sub) + "->" + "".join(out_sub)


def _kron_p_times(
    factors: tuple[Array, ...],
    cache: tuple[Array | None, ...] | None,
    dense: tuple[bool, ...],
    stores_p: bool,
    x: Array,
) -> Array:
    """P·x on the factors' shape with the given (already cast) factors/cache: one einsum."""
    if stores_p:
        cache = factors  # a stored-P factor is its own cache
    cached = cache is not None
    ops = []
    for i, (f, d) in enumerate(zip(factors, dense)):
        if not d:
            ops.append(f.astype(x.dtype) if stores_p else abs2(f).astype(x.dtype))
        elif cached:
            ops.append(cache[i].astype(x.dtype))
        else:
            f = f.astype(x.dtype)
            ops.extend([jnp.conj(f), f])
    return jnp.einsum(_apply_einsum(dense, cached), *ops, x)


def _apply_sides(kinds: tuple[str, str], stores_p: bool, left: Array, right: Array,
                 x: Array) -> Array:
    """`_kron_p_times` for a matrix from the fused apply's per-side operands (the fused
    apply's reference): a dense side is Q, or its P when `"cached"` (stored-P factors are
    always `"cached"`); a diagonal side is the factor's vector."""
    factors = (left, right)
    dense = tuple(k != "diag" for k in kinds)
    cached = "cached" in kinds and not stores_p
    cache = tuple(f if k == "cached" else None for f, k in zip(factors, kinds)) if cached \
        else None
    return _kron_p_times(factors, cache, dense, stores_p, x)


def _solve_along(q: Array, x: Array, axis: int) -> Array:
    """Q⁻ᴴ ×_axis x for an upper-triangular Q: one solve with the other axes as columns."""
    xm = jnp.moveaxis(x, axis, 0)
    sol = solve_upper_h(q, xm.reshape(q.shape[0], -1))
    return jnp.moveaxis(sol.reshape(xm.shape), 0, axis)


class _KronContractions(AbstractContractions):
    """`KronQ`'s primitives for [`fit_statistics`][psgd_eqx._geometry.fit_statistics]:
    mode products along each axis, and Contract sums over all the other axes."""

    qs: tuple[Array, ...]
    cache: tuple[Array | None, ...] | None
    dense: tuple[bool, ...] = eqx.field(static=True)
    stores_p: bool = eqx.field(static=True)
    # dense factors whose statistic stays the probe y (a `Gram`) for the fused refit
    gram: bool = eqx.field(static=True, default=False)

    @property
    def num_factors(self) -> int:
        return len(self.qs)

    def p_times(self, x: Array) -> Array:
        return _kron_p_times(self.qs, self.cache, self.dense, self.stores_p, x)

    def factor_times(self, i: int, x: Array) -> Array:
        return (_mode_product if self.dense[i] else _mode_scale)(self.qs[i], x, i)

    def factor_inv_h_times(self, i: int, x: Array) -> Array:
        if self.dense[i]:
            return _solve_along(self.qs[i], x, i)
        return _mode_scale(1.0 / jnp.conj(self.qs[i]), x, i)

    def contract(self, i: int, x: Array) -> Statistic:
        if not self.dense[i]:
            return _contract_diag(x, i)
        if self.gram:
            return Gram(jnp.moveaxis(x, i, 0).reshape(x.shape[i], -1))
        return _contract(x, x, i)

    def factor_gram(self, i: int) -> Array:
        q = self.qs[i]
        return q @ jnp.conj(q).T if self.dense[i] else abs2(q)

    def whitening_scale(self, i: int) -> Float[Array, ""]:
        n = [q.shape[0] for q in self.qs]
        return jnp.asarray(math.prod(n) / n[i], real_dtype(self.qs[i].dtype))


class KronQ(AbstractGeometryPrecond):
    """Kronecker-factored preconditioner Q = Q₁ ⊗ … ⊗ Q_k for a tensor of any rank.

    One factor per axis of size > 1 (size-1 axes are squeezed; scalars get one 1×1
    diagonal factor): a dense n×n matrix (upper-triangular for the `EQ` geometry), or a
    diagonal stored as a length-n vector. P = QᴴQ acts on axis i through Qᵢᴴ Qᵢ.

    Fields: `factors` (one array per squeezed axis), `lipschitz` (the per-factor
    Lipschitz estimates L, kept in f32), `cache` (optional Pᵢ = QᵢᴴQᵢ per dense factor,
    recomputed at each refit so that `apply` costs one product per axis between refits),
    `merged` (static, optional: the factors act on this reshape of the squeezed shape,
    adjacent axes merged; see `merge_small_dims` in [`psgd_eqx.kron_plan`][]).
    """

    factors: tuple[Array, ...]
    lipschitz: Float[Array, " k"]
    cache: tuple[Array | None, ...] | None
    shape: tuple[int, ...] = eqx.field(static=True)
    dense: tuple[bool, ...] = eqx.field(static=True)
    geometry: str = eqx.field(static=True)
    merged: tuple[int, ...] | None = eqx.field(static=True, default=None)
    use_kernels: bool | str = eqx.field(static=True, default="auto")
    _guards_finite: ClassVar[bool] = True

    def __check_init__(self):
        check_use_kernels(self.use_kernels)
        axes = self.axes_shape
        if math.prod(axes) != math.prod(squeezed_shape(self.shape)):
            raise ValueError(
                f"`KronQ(merged=...)`: {self.merged} is not a reshape of shape {self.shape}."
            )
        if len(self.factors) != len(axes) or len(self.dense) != len(axes):
            raise ValueError(
                f"`KronQ` needs one factor per squeezed axis {axes} of shape {self.shape}; "
                f"got {len(self.factors)} factors and {len(self.dense)} `dense` flags."
            )
        for i, (f, n, d) in enumerate(zip(self.factors, axes, self.dense)):
            want = (n, n) if d else (n,)
            if f.shape != want:
                raise ValueError(
                    f"`KronQ(factors=...)`: factor {i} must have shape {want}; got {f.shape}."
                )
        if self.lipschitz.shape != (len(axes),):
            raise ValueError(
                f"`KronQ(lipschitz=...)` must have shape {(len(axes),)}; got "
                f"{self.lipschitz.shape}."
            )

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...],
        dtype=jnp.float32,
        *,
        dense: tuple[bool, ...] | None = None,
        geometry: str = "PRO",
        init_scale: float | ArrayLike = 1.0,
        cache_preconditioner: bool = False,
        merged: tuple[int, ...] | None = None,
        use_kernels: bool | str = "auto",
    ) -> "KronQ":
        """Q = `init_scale`·I for a parameter of the given shape.

        **Arguments:**

        - `shape`: the parameter's shape (any rank; size-1 axes are squeezed).
        - `dtype`: storage dtype of the factors (the Lipschitz state is always ≥ f32).
        - `dense`: per squeezed axis, dense (True) or diagonal (False); `None` = all dense.
            See [`psgd_eqx.kron_plan`][] for the rules the optimizers use.
        - `geometry`: `"EQ"`, `"QEQ"`, `"QEP"`, `"PRO"` (= `"Q0.5EQ1.5"`), `"QUAD"`, or
            `"PRO4P"`/`"QUAD4P"` (the factors store P itself).
        - `init_scale`: the overall scale of Q (spread evenly over the factors).
        - `cache_preconditioner`: keep Pᵢ = QᵢᴴQᵢ of the dense factors (more memory,
            cheaper `apply` between refits).
        - `merged`: optional shape the factors act on instead of the squeezed shape: a
            reshape of it that merges adjacent axes (then `dense` has one flag per
            merged axis).
        - `use_kernels`: `"auto"` (a Pallas kernel on GPU where measured faster than
            XLA), `True` (kernels on GPU/TPU wherever one exists and fits: the fused
            refit of dense `PRO`/`EQ`/`QUAD` factors, the fused apply of a matrix), `False`
            (never), or `"interpret"` (kernels in the Pallas interpreter, for tests).

        **Returns:** the preconditioner.
        """
        shape = tuple(int(n) for n in shape)
        geometry = canonical_geometry(geometry)
        if merged is not None:
            merged = tuple(int(n) for n in merged)
            if math.prod(merged) != math.prod(squeezed_shape(shape)):
                raise ValueError(f"`merged`={merged} is not a reshape of shape {shape}.")
        axes = squeezed_shape(shape) if merged is None else merged
        if dense is None:
            dense = tuple(n > 1 for n in axes)
        dense = tuple(bool(d) and n > 1 for d, n in zip(dense, axes))
        if len(dense) != len(axes):
            raise ValueError(
                f"`dense` must have one flag per squeezed axis {axes}; got {len(dense)}."
            )
        # PRO4P/QUAD4P store P itself, so the scale of Q enters squared.
        per = GeometrySpec(geometry).factor_scale(init_scale) ** (1.0 / len(axes))
        factors = tuple(
            (jnp.eye(n, dtype=dtype) if d else jnp.ones((n,), dtype)) * per.astype(dtype)
            for n, d in zip(axes, dense)
        )
        lip = jnp.zeros((len(axes),), real_dtype(compute_dtype(dtype)))
        out = cls(factors, lip, None, shape, dense, geometry, merged, use_kernels)
        return out._with_cache(cache_preconditioner)

    # -- helpers ---------------------------------------------------------------------

    @property
    def axes_shape(self) -> tuple[int, ...]:
        """The shape the factors act on: the squeezed shape, or `merged`."""
        return squeezed_shape(self.shape) if self.merged is None else self.merged

    def _with_cache(self, enabled: bool) -> "KronQ":
        # A stored-P factor is its own cache.
        if not enabled or GeometrySpec(self.geometry).stores_p:
            return eqx.tree_at(lambda q: q.cache, self, None, is_leaf=lambda x: x is None)
        cache = tuple(
            (jnp.conj(f.T) @ f) if d else None for f, d in zip(self.factors, self.dense)
        )
        return eqx.tree_at(lambda q: q.cache, self, cache, is_leaf=lambda x: x is None)

    def _apply_p(self, factors, cache, x: Array) -> Array:
        """P·x on the factors' shape with the given (already cast) factors/cache."""
        stores_p = GeometrySpec(self.geometry).stores_p
        return _kron_p_times(factors, cache, self.dense, stores_p, x)

    # -- public API --------------------------------------------------------------------

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g with P = QᴴQ, as one einsum over all factors (Pᵢ from the cache if kept).

        **Arguments:**

        - `g`: an array of the parameter's shape `self.shape`.

        **Returns:** P·g with the shape and dtype of `g` (computed in the wider of the
        factor and gradient dtypes).
        """
        if g.shape != self.shape:
            raise ValueError(f"`KronQ.apply` expects shape {self.shape}; got {g.shape}.")
        dtype = promote(self.factors[0].dtype, g.dtype)
        x = g.reshape(self.axes_shape).astype(dtype)
        if len(self.axes_shape) == 2 and apply_applies(
                (dtype, self.factors[0].dtype), self.use_kernels):
            out = self._fused_apply(x)
        else:
            out = self._apply_p(self.factors, self.cache, x)
        return out.reshape(self.shape).astype(g.dtype)

    def _fused_apply(self, x: Array) -> Array:
        """P·x of a matrix through the fused apply (one launch per stack)."""
        stores_p = GeometrySpec(self.geometry).stores_p
        cached = stores_p or self.cache is not None
        kinds = tuple("diag" if not d else "cached" if cached else "dense" for d in self.dense)
        sides = tuple(
            self.cache[i] if (k == "cached" and not stores_p) else f
            for i, (f, k) in enumerate(zip(self.factors, kinds))
        )
        cfg = ApplyConfig(kinds, stores_p, self.use_kernels, _apply_sides)
        return fused_apply(cfg, *sides, x)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "KronQ":
        """Every factor's step on its statistics, then (maybe) a rebalance of the factors."""
        spec = GeometrySpec(self.geometry)
        cd = compute_dtype(promote(self.factors[0].dtype, h.dtype))
        key_bal, key_fac = _rng.split(key)
        qs = tuple(f.astype(cd) for f in self.factors)
        if spec.balance_every_update:
            qs = balance_factors(qs)
        gram = refit_applies(spec.name, cd, self.use_kernels)
        ops = _KronContractions(qs, self._fit_cache(cd), self.dense, spec.stores_p, gram)
        x = h.reshape(self.axes_shape).astype(cd)
        vv = None if v is None else v.reshape(self.axes_shape).astype(cd)
        stats = fit_statistics(spec.name, ops, x, vv)

        keys = _rng.split(key_fac, len(qs))
        lr = jnp.asarray(lr, real_dtype(cd))
        old_l = self.lipschitz.astype(real_dtype(cd))
        new_qs, new_l = zip(*(
            fit_factor(spec.name, q, t1, t2, old_l[i], lr, keys[i], normaliser, dense=d,
                       use_kernels=self.use_kernels)
            for i, (q, d, (t1, t2)) in enumerate(zip(qs, self.dense, stats))
        ))
        if not spec.balance_every_update:
            new_qs = maybe_balance(tuple(new_qs), key_bal, balance_probability)
        factors = tuple(nq.astype(f.dtype) for nq, f in zip(new_qs, self.factors))
        out = KronQ(factors, jnp.stack(new_l).astype(self.lipschitz.dtype), None, self.shape,
                    self.dense, self.geometry, self.merged, self.use_kernels)
        return out._with_cache(self.cache is not None)

    def _fit_cache(self, cd) -> tuple[Array | None, ...] | None:
        """The cached Pᵢ for the fit's P·h, in the compute dtype; `None` when there is none,
        and for QEP, whose P·h is formed from the factors it has just rebalanced."""
        if self.cache is None or GeometrySpec(self.geometry).balance_every_update:
            return None
        return tuple(None if c is None else c.astype(cd) for c in self.cache)

    # -- the fit form: KronQs whose axes are permutations of each other (an MLP's w_in
    # (d, 4d) and w_out (4d, d)) are fitted in one layout, so the optimizer compiles one
    # refit for both (`_fit.refit_groups`). Fitting in the permuted layout is the same
    # maths; only which random numbers each factor draws differs, and the optimizer
    # always fits in this form, so its results do not depend on what was merged.

    def _fit_order(self) -> tuple[int, ...]:
        """The canonical order of the axes: dense factors first, then by size (stable)."""
        axes = self.axes_shape
        return tuple(sorted(range(len(axes)), key=lambda i: (not self.dense[i], axes[i])))

    def _in_fit_form(self) -> bool:
        order = self._fit_order()
        return order == tuple(range(len(order))) and self.shape == self.axes_shape

    def _fit_form(self) -> "KronQ":
        if self._in_fit_form():
            return self
        order = self._fit_order()
        axes = self.axes_shape
        cache = None if self.cache is None else tuple(self.cache[i] for i in order)
        return KronQ(tuple(self.factors[i] for i in order),
                     self.lipschitz[jnp.asarray(order)], cache,
                     tuple(axes[i] for i in order), tuple(self.dense[i] for i in order),
                     self.geometry, None, self.use_kernels)

    def _fit_input(self, x: Array) -> Array:
        if self._in_fit_form():
            return x
        return jnp.transpose(x.reshape(self.axes_shape), self._fit_order())

    def _from_fit_form(self, fitted: "KronQ") -> "KronQ":
        if self._in_fit_form():
            return fitted
        order = self._fit_order()
        back = tuple(order.index(i) for i in range(len(order)))
        cache = None if fitted.cache is None else tuple(fitted.cache[j] for j in back)
        return KronQ(tuple(fitted.factors[j] for j in back),
                     fitted.lipschitz[jnp.asarray(back)], cache, self.shape, self.dense,
                     self.geometry, self.merged, self.use_kernels)

    def rescale(self, scale: ArrayLike) -> "KronQ":
        """Q ← scale·Q, spread evenly over the factors (scale^(1/k) each).

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `KronQ`.
        """
        per = GeometrySpec(self.geometry).factor_scale(scale) ** (1.0 / len(self.factors))
        factors = tuple(f * per.astype(f.dtype) for f in self.factors)
        out = KronQ(factors, self.lipschitz, None, self.shape, self.dense, self.geometry,
                    self.merged, self.use_kernels)
        return out._with_cache(self.cache is not None)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P = P₁ ⊗ … ⊗ P_k as a dense matrix over the row-major flattened parameter.

        **Returns:** an `(N, N)` array (tests and small problems only).
        """
        p = jnp.ones((1, 1), compute_dtype(self.factors[0].dtype))
        for f, d in zip(self.factors, self.dense):
            f = f.astype(p.dtype)
            if GeometrySpec(self.geometry).stores_p:
                pi = f if d else jnp.diag(f)
            else:
                pi = jnp.conj(f.T) @ f if d else jnp.diag(abs2(f).astype(p.dtype))
            p = jnp.kron(p, pi)
        return p
