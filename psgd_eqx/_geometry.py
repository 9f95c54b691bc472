"""Lie-group geometries: the one place where a factor update rule is written down.

A fit step of every structure reduces, per factor, to a pair of Hermitian statistics
(T₁, T₂) whose balance `T₁ = T₂` is the fixed point of the preconditioner fit:

- whitening with v integrated out: T₁ = Contract(Pg, Pg), T₂ = c·I with c = N/n;
- Newton or whitening with an explicit v: T₂ = Contract(v, v) (or its geometry variant).

Which vectors are contracted is the geometry's choice too, and is written down once here,
in [`fit_statistics`][psgd_eqx._geometry.fit_statistics]:

| geometry | T₁ contracts | T₂ contracts | T₂ with v integrated out |
|---|---|---|---|
| `EQ` | Q·h | Q⁻ᴴ·v | — (v is needed) |
| `QEP` | Qᵢ·(P·h) | Qᵢ·v | c·QᵢQᵢᴴ |
| the others | P·h | v | c·I |

A structure supplies only its primitives (products with its factors, the solves with Qᵢᴴ,
P·x, its Contract and its c) as an
[`AbstractContractions`][psgd_eqx._geometry.AbstractContractions].

Given (T₁, T₂) the *geometry* says how Q moves along the group. With E = T₁ − T₂ and the
normalised step η = μ/L:

| geometry | dense factor | diagonal factor |
|---|---|---|
| `EQ` (dQ = E Q, triangular group) | Q − η triu(E) Q | q − η E q |
| `QEQ` (dQ = Q E Q) | Q − η Q E | same as EQ |
| `QEP` (dQ = Q E P) | Q − η E Q (statistics carry Q) | same as EQ |
| `PRO` (dQ = Q^½ E Q^{3/2}) | Q − η E Q, then one Procrustes step | same as EQ |
| `QUAD` (quadratic form) | p = Q − η/2 E Q; p − η/2 p E; (p + pᴴ)/2 | q (1 − η/2 E)² |
| `PRO4P` (the factor *is* P) | P − η E P, then ≤ 10 third-order Procrustes steps | p − η E p |
| `QUAD4P` (the factor *is* P) | p = P − η E P; p − η p E; (p + pᴴ)/2 | p (1 − η E)² |

A Kron factor, a `DenseQ` matrix, the 2×2 blocks of an `XMatQ`, a diagonal `DiagQ` and the
diagonal of an `LRAQ` all call these functions; the structures only differ in their
primitives. A statistic is a matrix, a vector (a diagonal factor), a scalar c meaning c·I,
or an [`Outer`][psgd_eqx._geometry.Outer] V Vᴴ of a few vectors (the rank-1 statistics of a
global dense Q, which are never formed as n×n matrices).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from . import _rng
from ._fused import Gram, RefitConfig, fused_fit_factor, refit_applies
from ._norms import Normaliser
from ._numerics import promote, real_dtype
from ._ops import eq_triangular_step


GEOMETRIES: tuple[str, ...] = ("EQ", "QEQ", "QEP", "PRO", "QUAD", "PRO4P", "QUAD4P")
_ALIASES = {"Q0.5EQ1.5": "PRO", "Q0p5EQ1p5": "PRO"}

# Procrustes step bound of the reference: the 2nd-order expansion of exp(aR) has
# truncation error ≤ ‖aR‖⁴/4, below 1e-3 for a ≤ 1/4; the reference (and we) use 1/8.
PROCRUSTES_MAX_STEP = 1.0 / 8.0
# The 3rd-order expansion I + aR + (aR)²/2 + (aR)³/8 has error ≤ ‖aR‖⁶/64; PRO4P runs up to
# `PROCRUSTES_4P_ITERS` such steps (max step 1/3) until P is Hermitian to 1e-3 relative.
PROCRUSTES_3_MAX_STEP = 1.0 / 3.0
PROCRUSTES_4P_ITERS = 10
PROCRUSTES_4P_TOL = 1e-3


def canonical_geometry(name: str) -> str:
    """Map a user spelling (`"PRO"`, `"Q0.5EQ1.5"`, `"Q0p5EQ1p5"`, ...) to its canonical name.

    **Arguments:**

    - `name`: one of [`GEOMETRIES`][psgd_eqx.GEOMETRIES] or an alias of `"PRO"`.

    **Returns:** the canonical name.

    Raises `ValueError` naming `geometry` for anything else.
    """
    if not isinstance(name, str):
        raise ValueError(f"`geometry` must be a string; got {name!r}.")
    canon = _ALIASES.get(name, name)
    if canon not in GEOMETRIES:
        raise ValueError(
            f"`geometry` must be one of {GEOMETRIES} (or 'Q0.5EQ1.5' for 'PRO'); got {name!r}."
        )
    return canon


class Outer(eqx.Module):
    """A Hermitian statistic V Vᴴ kept in factored form: V is `(..., n, k)` with k ≪ n.

    A global dense Q fitted on one (v, h) pair has rank-1 statistics T₁ = a aᴴ and
    T₂ = v vᴴ; products E·Q then cost O(n²) instead of O(n³), and the norm bound is the
    trace ‖V‖²_F (exact for k = 1, the reference's `DenseNewton` normaliser).
    """

    vecs: Array

    def lmul(self, q: Array) -> Array:
        """V (Vᴴ q)."""
        return self.vecs @ (jnp.conj(jnp.swapaxes(self.vecs, -1, -2)) @ q)

    def rmul(self, q: Array) -> Array:
        """(q V) Vᴴ."""
        return (q @ self.vecs) @ jnp.conj(jnp.swapaxes(self.vecs, -1, -2))

    def matrix(self) -> Array:
        """V Vᴴ as a dense matrix."""
        return self.lmul(_identity_like(self.vecs.shape[-2], self.vecs.dtype))

    def triu_lmul(self, q: Array) -> Array:
        """triu(V Vᴴ)·q in O(n²k): row i is Σₖ V[i,k] Σ_{j≥i} conj(V[j,k]) q[j,:], a suffix
        sum over rows (EQ's triangular restriction without forming the n×n matrix)."""
        w = jnp.conj(self.vecs)[..., :, :, None] * q[..., :, None, :]  # (n, k, m)
        # associative_scan: ~2× faster than jnp.cumsum (reduce_window) on CPU
        suffix = jax.lax.associative_scan(jnp.add, w, reverse=True, axis=w.ndim - 3)
        return jnp.einsum("...ik,...ikm->...im", self.vecs, suffix)

    def trace(self) -> Array:
        """tr(V Vᴴ) = ‖V‖²_F (real)."""
        return jnp.sum(jnp.real(self.vecs * jnp.conj(self.vecs)), axis=(-2, -1))


class GeometrySpec(eqx.Module):
    """Static facts about a geometry that a structure needs to compute its statistics."""

    name: str = eqx.field(static=True)

    @property
    def needs_v(self) -> bool:
        """The statistics need the probe v explicitly (EQ: T₂ = Contract(Q⁻ᴴv, Q⁻ᴴv)); the
        other geometries integrate v out for whitening (T₂ = c·I)."""
        return self.name == "EQ"

    @property
    def stats_carry_q(self) -> bool:
        """QEP: the statistics are taken of Qᵢ·(Pg) and Qᵢ·v instead of Pg and v."""
        return self.name == "QEP"

    @property
    def stores_p(self) -> bool:
        """PRO4P/QUAD4P: the stored factor is P itself, so P·g applies each factor once."""
        return self.name in ("PRO4P", "QUAD4P")

    def factor_scale(self, scale: ArrayLike) -> Array:
        """What the stored factor is multiplied by when Q is scaled by `scale`: `scale`, or
        `scale²` for the stored-P geometries (f32 or wider, real)."""
        scale = jnp.asarray(scale)
        scale = scale.astype(promote(scale.dtype, jnp.float32))
        return scale * scale if self.stores_p else scale

    @property
    def balance_every_update(self) -> bool:
        """QEP's normaliser is not invariant to factor scaling, so it balances every update."""
        return self.name == "QEP"


# A statistic: a matrix, a vector (diagonal factor), a scalar c meaning c·I, an `Outer`, or
# a `Gram` y yᴴ kept as y for the fused refit (only `fit_factor` ever sees one).
Statistic = Array | Outer | Gram


class AbstractContractions(eqx.Module):
    """The primitives of one structure from which [`fit_statistics`][] forms (T₁, T₂).

    The structure is seen as Q = Q₁ ⊗ … ⊗ Q_k: factor i acts along one axis of the
    (reshaped) parameter, and k = 1 for a `DenseQ`, a `DiagQ` or one 2×2 block of an
    `XMatQ`. Every array is in the compute dtype; a final subclass holds the factors it
    needs (and its cache), and nothing in it depends on the geometry except how P·x is
    formed for the stored-P geometries.
    """

    num_factors: eqx.AbstractVar[int]

    @abc.abstractmethod
    def p_times(self, x: Array) -> Array:
        """P·x (with the structure's cache, or its stored P, where it has one)."""

    @abc.abstractmethod
    def factor_times(self, i: int, x: Array) -> Array:
        """Qᵢ applied to x along factor i's axis (a mode product, or a scale)."""

    @abc.abstractmethod
    def factor_inv_h_times(self, i: int, x: Array) -> Array:
        """Qᵢ⁻ᴴ applied to x along factor i's axis (a triangular or closed-form solve)."""

    @abc.abstractmethod
    def contract(self, i: int, x: Array) -> Statistic:
        """Contractᵢ(x, x): x xᴴ summed over every axis but factor i's (a matrix or an
        `Outer` for a dense factor, the real vector Σ|x|² for a diagonal one)."""

    @abc.abstractmethod
    def factor_gram(self, i: int) -> Array:
        """QᵢQᵢᴴ (the vector |qᵢ|² for a diagonal factor)."""

    @abc.abstractmethod
    def whitening_scale(self, i: int) -> Float[Array, ""]:
        """c = N/nᵢ, the integrated-out E[v vᴴ] contracted over the other axes (real)."""


class MatrixContractions(AbstractContractions):
    """The primitives of one dense factor acting on a whole vector (no other axes to
    contract, so c = 1): `DenseQ`'s Q and each 2×2 block of `XMatQ`. Its statistics are
    rank-1 `Outer` products; the structure supplies only Q⁻ᴴx (`solve_h`)."""

    q: Array
    stores_p: bool = eqx.field(static=True)
    solve_h: Callable[[Array, Array], Array] = eqx.field(static=True)

    @property
    def num_factors(self) -> int:
        return 1

    def p_times(self, x: Array) -> Array:
        q = self.q
        return q @ x if self.stores_p else jnp.conj(q.T) @ (q @ x)

    def factor_times(self, i: int, x: Array) -> Array:
        return self.q @ x

    def factor_inv_h_times(self, i: int, x: Array) -> Array:
        return self.solve_h(self.q, x)

    def contract(self, i: int, x: Array) -> "Statistic":
        return Outer(x[:, None])

    def factor_gram(self, i: int) -> Array:
        return self.q @ jnp.conj(self.q.T)

    def whitening_scale(self, i: int) -> Float[Array, ""]:
        return jnp.ones((), real_dtype(self.q.dtype))


def fit_statistics(
    geometry: str, ops: AbstractContractions, h: Array, v: Array | None
) -> tuple[tuple[Statistic, Statistic], ...]:
    """The statistics (T₁, T₂) of every factor of a structure for one fit pair.

    See the module table: `EQ` contracts a = Q·h and b = Q⁻ᴴ·v (its triangular group
    needs b, so it has no integrated-out form); `QEP` contracts Qᵢ·(P·h) and Qᵢ·v; the
    other geometries P·h and v. With `v = None` T₂ is integrated out.

    **Arguments:**

    - `geometry`: canonical geometry name.
    - `ops`: the structure's primitives, holding its factors in the compute dtype.
    - `h`: the damped gradient or Hessian-vector product, in the compute dtype and the
        shape the factors act on.
    - `v`: the probe likewise, or `None` for whitening with v integrated out.

    **Returns:** one `(T₁, T₂)` per factor.
    """
    spec = GeometrySpec(geometry)
    if v is None and spec.needs_v:
        raise ValueError(f"geometry {geometry!r} needs the probe `v` explicitly.")
    factors = range(ops.num_factors)
    if spec.name == "EQ":
        a = _through_factors(ops.factor_times, ops.num_factors, h)
        b = _through_factors(ops.factor_inv_h_times, ops.num_factors, v)
        return tuple((ops.contract(i, a), ops.contract(i, b)) for i in factors)
    pg = ops.p_times(h)
    stats = []
    for i in factors:
        y = ops.factor_times(i, pg) if spec.stats_carry_q else pg
        stats.append((ops.contract(i, y), _second_statistic(spec, ops, i, v)))
    return tuple(stats)


def _through_factors(times, count: int, x: Array) -> Array:
    """x with every factor's operator `times(i, ·)` applied along its axis, in order."""
    for i in range(count):
        x = times(i, x)
    return x


def _second_statistic(
    spec: GeometrySpec, ops: AbstractContractions, i: int, v: Array | None
) -> Statistic:
    """T₂ of factor i for the P·h geometries: Contract of v (QEP: of Qᵢ·v), or with v
    integrated out E[v vᴴ] = I contracted to c·I (QEP: Qᵢ (c·I) Qᵢᴴ = c·QᵢQᵢᴴ)."""
    if v is not None:
        return ops.contract(i, ops.factor_times(i, v) if spec.stats_carry_q else v)
    c = ops.whitening_scale(i)
    if not spec.stats_carry_q:
        return c
    gram = ops.factor_gram(i)
    # c is real; cast it so a complex QQᴴ passes strict dtype promotion (exact: c + 0i).
    return c.astype(gram.dtype) * gram


def _identity_like(n: int, dtype) -> Array:
    return jnp.eye(n, dtype=dtype)


def _lmul(t, q: Array) -> Array:
    """T·q for a statistic that is a matrix, a scalar (·I) or an `Outer`."""
    if isinstance(t, Outer):
        return t.lmul(q)
    if t.ndim == 0:
        return t.astype(q.dtype) * q
    return t.astype(q.dtype) @ q


def _rmul(q: Array, t) -> Array:
    """q·T (see `_lmul`)."""
    if isinstance(t, Outer):
        return t.rmul(q)
    if t.ndim == 0:
        return q * t.astype(q.dtype)
    return q @ t.astype(q.dtype)


def _matrix(t, n: int, dtype) -> Array:
    if isinstance(t, Outer):
        return t.matrix().astype(dtype)
    if t.ndim == 0:
        return t.astype(dtype) * _identity_like(n, dtype)
    return t.astype(dtype)


def dense_lipschitz(t1, t2, key: PRNGKeyArray, normaliser: Normaliser) -> Float[Array, ""]:
    """ℓ = lower bound of ‖T₁ + T₂‖ for a dense factor.

    With T₂ = c·I this is ℓ(T₁) + c, exactly as the reference writes it. For factored
    (`Outer`) statistics it is the trace, ‖V₁‖² + ‖V₂‖² (the reference's `DenseNewton`).
    """
    if isinstance(t1, Outer) and (isinstance(t2, Outer) or t2.ndim == 0):
        rd = real_dtype(t1.vecs.dtype)
        second = t2.trace() if isinstance(t2, Outer) else jnp.real(t2)
        return (t1.trace() + second.astype(rd)).astype(rd)
    t1 = t1.matrix() if isinstance(t1, Outer) else t1
    t2 = t2.matrix() if isinstance(t2, Outer) else t2
    if t2.ndim == 0:
        return normaliser.norm_lower_bound(t1, key) + jnp.real(t2).astype(real_dtype(t1.dtype))
    return normaliser.norm_lower_bound(t1 + t2.astype(t1.dtype), key)


def diag_lipschitz(t1: Array, t2: Array) -> Float[Array, ""]:
    """ℓ = max(T₁ + T₂) for a diagonal factor (the statistics are real and ≥ 0)."""
    return jnp.max(jnp.real(t1) + jnp.real(t2))


def _normalised_generator(q: Array, key: PRNGKeyArray, normaliser: Normaliser) -> Array:
    # R = Qᴴ − Q is typically tiny; normalise it by a lower bound of its norm.
    r = jnp.conj(q.T) - q
    tiny = jnp.finfo(real_dtype(q.dtype)).smallest_normal
    return r / (normaliser.norm_lower_bound(r, key) + tiny).astype(q.dtype)


def procrustes_step(
    q: Array, key: PRNGKeyArray, normaliser: Normaliser, max_step: float = PROCRUSTES_MAX_STEP
) -> Array:
    """One online step of min_U ‖UQ − I‖ over unitary U: Q ← exp(aR)Q to 2nd order.

    R = Qᴴ − Q is the generator, normalised by a lower bound of its norm (it is typically
    tiny), and a ≤ `max_step` comes from a line search on tr(RQ) + a tr(R²Q). This keeps PRO
    factors ≈ Hermitian positive definite without any eigendecomposition.

    **Arguments:**

    - `q`: a square factor (compute dtype).
    - `key`: randomness for the norm bound of R.
    - `normaliser`: which norm bound to use.
    - `max_step`: the largest rotation step a.

    **Returns:** the rotated factor.
    """
    r = _normalised_generator(q, key, normaliser)
    rq = r @ q
    rrq = r @ rq
    tr_rq = jnp.real(jnp.trace(rq))
    tr_rrq = jnp.real(jnp.trace(rrq))
    safe = jnp.where(tr_rrq < 0, tr_rrq, -jnp.ones_like(tr_rrq))
    a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, max_step), max_step)
    a = a.astype(q.dtype)
    return q + a * (rq + 0.5 * a * rrq)


def procrustes_step3(
    q: Array, key: PRNGKeyArray, normaliser: Normaliser, max_step: float = PROCRUSTES_3_MAX_STEP
) -> Array:
    """One 3rd-order Procrustes rotation Q ← (I + aR + (aR)²/2 + (aR)³/8) Q.

    The step a is the larger root of the derivative of tr(UQ) along the expansion,
    tr(RQ) + a tr(R²Q) + (3/8) a² tr(R³Q) = 0, capped at `max_step`; when tr(RQ) ≤ 0 or
    tr(R³Q) ≥ 0, Q is already Hermitian to working precision and is returned unchanged.

    **Arguments:** as [`procrustes_step`][psgd_eqx._geometry.procrustes_step].

    **Returns:** the rotated factor.
    """
    r = _normalised_generator(q, key, normaliser)
    rq = r @ q
    rrq = r @ rq
    rrrq = r @ rrq
    t1, t2, t3 = (jnp.real(jnp.trace(m)).astype(jnp.float32) for m in (rq, rrq, rrrq))
    go = (t1 > 0) & (t3 < 0)
    safe3 = jnp.where(go, t3, -1.0)
    disc = jnp.maximum(t2 * t2 - 1.5 * t1 * safe3, 0.0)
    a = jnp.minimum((-t2 - jnp.sqrt(disc)) / (0.75 * safe3), max_step)
    a = jnp.where(go, a, 0.0).astype(q.dtype)
    return q + a * (rq + 0.5 * a * (rrq + 0.25 * a * rrrq))


def _hermitian_gap(q: Array) -> Array:
    return jnp.max(jnp.abs(jnp.conj(q.T) - q)) - PROCRUSTES_4P_TOL * jnp.max(jnp.abs(q))


def procrustes_until_hermitian(q: Array, key: PRNGKeyArray, normaliser: Normaliser) -> Array:
    """PRO4P's projection: up to `PROCRUSTES_4P_ITERS` 3rd-order Procrustes steps, stopping
    once ‖Pᴴ − P‖_max < 1e-3 ‖P‖_max (a `lax.while_loop`, so it works under jit and vmap)."""

    def cond(carry):
        i, p, _ = carry
        return (i < PROCRUSTES_4P_ITERS) & (_hermitian_gap(p) >= 0)

    def body(carry):
        i, p, k = carry
        k, sub = _rng.split(k)
        return i + 1, procrustes_step3(p, sub, normaliser), k

    _, q, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), q, key))
    return q


def dense_step(
    geometry: str,
    q: Array,
    t1,
    t2,
    eta: Float[Array, ""],
    key: PRNGKeyArray,
    normaliser: Normaliser,
    *,
    triangular: bool = True,
    use_kernels: bool | str = False,
) -> Array:
    """One normalised Lie-group step of a dense (or triangular) factor.

    **Arguments:**

    - `geometry`: canonical geometry name.
    - `q`: the factor, in the compute dtype.
    - `t1`, `t2`: the statistics: matrices, `Outer` factors, or (`t2` only) a scalar c
        meaning c·I.
    - `eta`: the normalised step μ/L (real scalar).
    - `key`: randomness for the Procrustes norm bounds (PRO, PRO4P).
    - `normaliser`: norm-bound configuration (PRO, PRO4P).
    - `triangular`: for `EQ`, restrict E to its upper triangle (the triangular group of a
        Kron or dense factor, whose inverse is a triangular solve); `False` keeps the full
        E (used where Q⁻¹ is cheap anyway, e.g. the 2×2 blocks of `XMatQ`).
    - `use_kernels`: for the triangular `EQ` step with matrix statistics, whether to
        dispatch to the fused Pallas kernel (see `psgd_eqx._ops`).

    **Returns:** the updated factor.
    """
    eta = eta.astype(q.dtype)

    def e_left(x):  # E·x
        return _lmul(t1, x) - _lmul(t2, x)

    def e_right(x):  # x·E
        return _rmul(x, t1) - _rmul(x, t2)

    if geometry == "EQ":
        if not triangular:
            return q - eta * e_left(q)
        if isinstance(t1, Outer) and isinstance(t2, Outer):
            return q - eta * (t1.triu_lmul(q) - t2.triu_lmul(q))
        n = q.shape[0]
        terms = (_matrix(t1, n, q.dtype), _matrix(t2, n, q.dtype))
        return eq_triangular_step(q, terms, eta, use_kernels)
    if geometry == "QEQ":
        return q - eta * e_right(q)
    if geometry == "QEP":
        return q - eta * e_left(q)
    if geometry == "PRO":
        return procrustes_step(q - eta * e_left(q), key, normaliser)
    if geometry == "PRO4P":
        return procrustes_until_hermitian(q - eta * e_left(q), key, normaliser)
    if geometry in ("QUAD", "QUAD4P"):
        step = 0.5 * eta if geometry == "QUAD" else eta
        p = q - step * e_left(q)
        p = p - step * e_right(p)
        return 0.5 * (p + jnp.conj(p.T))
    raise ValueError(f"unknown geometry {geometry!r}")


def diag_step(geometry: str, q: Array, t1: Array, t2: Array, eta: Float[Array, ""]) -> Array:
    """One normalised step of a diagonal factor (a vector); see the module table.

    **Arguments:** as [`dense_step`][], with `q`, `t1`, `t2` vectors (`t2` may be a scalar).

    **Returns:** the updated vector.
    """
    e = (jnp.real(t1) - jnp.real(t2)).astype(real_dtype(q.dtype))
    eta = eta.astype(e.dtype)
    if geometry in ("QUAD", "QUAD4P"):
        gain = 1.0 - (0.5 if geometry == "QUAD" else 1.0) * eta * e
        return q * (gain * gain).astype(q.dtype)
    # EQ, QEQ, QEP, PRO and PRO4P coincide on diagonal matrices (they commute).
    return q - (eta * e).astype(q.dtype) * q


def fit_factor(
    geometry: str,
    q: Array,
    t1: Statistic,
    t2: Statistic,
    old_l: Float[Array, ""],
    lr: ArrayLike,
    key: PRNGKeyArray,
    normaliser: Normaliser,
    *,
    dense: bool,
    use_kernels: bool | str = False,
) -> tuple[Array, Float[Array, ""]]:
    """One factor's normalised step: its norm bound ℓ, the new Lipschitz estimate L, and
    the geometry's move with η = μ/L.

    **Arguments:**

    - `geometry`: canonical geometry name.
    - `q`: the factor (a matrix if `dense`, else a vector), in the compute dtype.
    - `t1`, `t2`: its statistics from [`fit_statistics`][].
    - `old_l`: its previous Lipschitz estimate (sets the dtype of the new one).
    - `lr`: the preconditioner learning rate μ.
    - `key`: randomness for the norm bound and the Procrustes steps.
    - `normaliser`: the step-size normaliser.
    - `dense`: a dense (or triangular) factor rather than a diagonal one.
    - `use_kernels`: see [`dense_step`][].

    **Returns:** `(new factor, new L)`.
    """
    if isinstance(t2, Gram):  # EQ's second statistic: the kernel takes it as a matrix
        t2 = t2.matrix()
    if dense and isinstance(t1, (Array, Gram)) and not isinstance(t2, Outer) \
            and refit_applies(geometry, q.dtype, use_kernels):
        cfg = RefitConfig(geometry, normaliser, use_kernels, isinstance(t1, Gram),
                          _fit_factor_jnp)
        y_or_t1 = t1.y if isinstance(t1, Gram) else t1
        return fused_fit_factor(cfg, q, y_or_t1, t2, old_l, lr, key)
    if isinstance(t1, Gram):
        t1 = t1.matrix()
    return _fit_factor_jnp(geometry, q, t1, t2, old_l, lr, key, normaliser, use_kernels,
                           dense=dense)


def _fit_factor_jnp(geometry, q, t1, t2, old_l, lr, key, normaliser, use_kernels, *,
                    dense=True):
    """`fit_factor` in plain jnp (the fused kernel's reference on every platform)."""
    k_ell, k_step = _rng.split(key)
    ell = dense_lipschitz(t1, t2, k_ell, normaliser) if dense else diag_lipschitz(t1, t2)
    big_l, eta = normaliser.step(old_l, ell, lr)
    if dense:
        return dense_step(geometry, q, t1, t2, eta, k_step, normaliser,
                          use_kernels=use_kernels), big_l
    return diag_step(geometry, q, t1, t2, eta), big_l


def balance_factors(factors: tuple[Array, ...]) -> tuple[Array, ...]:
    """Rescale factors so their max-abs values share their geometric mean.

    The product (hence P) is unchanged; only the dynamic range of each factor is evened
    out, which avoids over/underflow of long products of factors in low precision.

    **Arguments:**

    - `factors`: the factors of one Kronecker product.

    **Returns:** the balanced factors.
    """
    if len(factors) < 2:
        return factors
    norms = [jnp.max(jnp.abs(f)).astype(real_dtype(f.dtype)) for f in factors]
    ok = jnp.all(jnp.stack([(n > 0) & jnp.isfinite(n) for n in norms]))
    safe = [jnp.where(ok, n, jnp.ones_like(n)) for n in norms]
    log_gmean = jnp.mean(jnp.stack([jnp.log(n) for n in safe]))
    return tuple(
        f * jnp.exp(log_gmean - jnp.log(n)).astype(f.dtype) for f, n in zip(factors, safe)
    )


def maybe_balance(
    factors: tuple[Array, ...], key: PRNGKeyArray, probability: float | ArrayLike
) -> tuple[Array, ...]:
    """Balance with the given probability (1.0: always, 0.0: never)."""
    if len(factors) < 2:
        return factors
    if isinstance(probability, (int, float)):
        if probability <= 0.0:
            return factors
        if probability >= 1.0:
            return balance_factors(factors)
    do = _rng.bernoulli(key, probability)
    return jax.lax.cond(do, balance_factors, lambda f: f, factors)
