"""Lie-group geometries: the one place where a factor update rule is written down.

A fit step of every structure reduces, per factor, to a pair of Hermitian statistics
(T₁, T₂) whose balance `T₁ = T₂` is the fixed point (anchors.md §2.1):

- whitening with v integrated out: T₁ = Contract(Pg, Pg), T₂ = c·I with c = N/n;
- Newton or whitening with an explicit v: T₂ = Contract(v, v) (or its geometry variant).

Given (T₁, T₂) the *geometry* says how Q moves along the group. With E = T₁ − T₂ and the
normalised step η = μ/L:

| geometry | dense factor | diagonal factor |
|---|---|---|
| `EQ` (dQ = E Q, triangular group) | Q − η triu(E) Q | q − η E q |
| `QEQ` (dQ = Q E Q) | Q − η Q E | same as EQ |
| `QEP` (dQ = Q E P) | Q − η E Q (statistics carry Q) | same as EQ |
| `PRO` (dQ = Q^½ E Q^{3/2}) | Q − η E Q, then one Procrustes step | same as EQ |
| `QUAD` (quadratic form) | p = Q − η/2 E Q; p − η/2 p E; (p + pᴴ)/2 | q (1 − η/2 E)² |

A Kron factor, a `DenseQ` matrix and a diagonal `DiagQ` all call these functions; the
structures only differ in how they compute T₁ and T₂ (their contractions).
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._norms import Normaliser
from ._numerics import real_dtype


Geometry = Literal["EQ", "QEQ", "QEP", "PRO", "QUAD"]
GEOMETRIES: tuple[str, ...] = ("EQ", "QEQ", "QEP", "PRO", "QUAD")
_ALIASES = {"Q0.5EQ1.5": "PRO", "Q0p5EQ1p5": "PRO"}

# Procrustes step bound of the reference: the 2nd-order expansion of exp(aR) has
# truncation error ≤ ‖aR‖⁴/4, below 1e-3 for a ≤ 1/4; the reference (and we) use 1/8.
PROCRUSTES_MAX_STEP = 1.0 / 8.0


def canonical_geometry(name: str) -> str:
    """Map a user spelling (`"PRO"`, `"Q0.5EQ1.5"`, `"Q0p5EQ1p5"`, ...) to its canonical name.

    **Arguments:**

    - `name`: one of `"EQ"`, `"QEQ"`, `"QEP"`, `"PRO"`, `"QUAD"` or an alias of `"PRO"`.

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


class GeometrySpec(eqx.Module):
    """Static facts about a geometry that a structure needs to compute its statistics."""

    name: str = eqx.field(static=True)

    @property
    def triangular(self) -> bool:
        """Dense factors live in the upper-triangular group (EQ)."""
        return self.name == "EQ"

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
    def balance_every_update(self) -> bool:
        """QEP's normaliser is not invariant to factor scaling, so it balances every update."""
        return self.name == "QEP"


def _identity_like(n: int, dtype) -> Array:
    return jnp.eye(n, dtype=dtype)


def _minus_scaled_identity(t1: Array, t2: Array) -> Array:
    """E = T₁ − T₂ where T₂ is a matrix or a scalar multiple of the identity."""
    if t2.ndim == 0:
        return t1 - t2.astype(t1.dtype) * _identity_like(t1.shape[0], t1.dtype)
    return t1 - t2.astype(t1.dtype)


def dense_lipschitz(
    t1: Array, t2: Array, key: PRNGKeyArray, normaliser: Normaliser
) -> Float[Array, ""]:
    """ℓ = lower bound of ‖T₁ + T₂‖ for a dense factor.

    With T₂ = c·I this is ℓ(T₁) + c, exactly as the reference writes it.
    """
    if t2.ndim == 0:
        return normaliser.norm_lower_bound(t1, key) + jnp.real(t2).astype(real_dtype(t1.dtype))
    return normaliser.norm_lower_bound(t1 + t2.astype(t1.dtype), key)


def diag_lipschitz(t1: Array, t2: Array) -> Float[Array, ""]:
    """ℓ = max(T₁ + T₂) for a diagonal factor (the statistics are real and ≥ 0)."""
    return jnp.max(jnp.real(t1) + jnp.real(t2))


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
    r = jnp.conj(q.T) - q
    tiny = jnp.finfo(real_dtype(q.dtype)).smallest_normal
    r = r / (normaliser.norm_lower_bound(r, key) + tiny).astype(q.dtype)
    rq = r @ q
    rrq = r @ rq
    tr_rq = jnp.real(jnp.trace(rq))
    tr_rrq = jnp.real(jnp.trace(rrq))
    safe = jnp.where(tr_rrq < 0, tr_rrq, -jnp.ones_like(tr_rrq))
    a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, max_step), max_step)
    a = a.astype(q.dtype)
    return q + a * (rq + 0.5 * a * rrq)


def dense_step(
    geometry: str,
    q: Array,
    t1: Array,
    t2: Array,
    eta: Float[Array, ""],
    key: PRNGKeyArray,
    normaliser: Normaliser,
) -> Array:
    """One normalised Lie-group step of a dense (or triangular) factor.

    **Arguments:**

    - `geometry`: canonical geometry name.
    - `q`: the factor, in the compute dtype.
    - `t1`, `t2`: the statistics; `t2` may be a scalar meaning `t2·I`.
    - `eta`: the normalised step μ/L (real scalar).
    - `key`: randomness for the Procrustes norm bound (PRO only).
    - `normaliser`: norm-bound configuration (PRO only).

    **Returns:** the updated factor.
    """
    e = _minus_scaled_identity(t1, t2)
    eta = eta.astype(q.dtype)
    if geometry == "EQ":
        return q - eta * (jnp.triu(e) @ q)
    if geometry == "QEQ":
        return q - eta * (q @ e)
    if geometry == "QEP":
        return q - eta * (e @ q)
    if geometry == "PRO":
        return procrustes_step(q - eta * (e @ q), key, normaliser)
    if geometry == "QUAD":
        half = 0.5 * eta
        p = q - half * (e @ q)
        p = p - half * (p @ e)
        return 0.5 * (p + jnp.conj(p.T))
    raise ValueError(f"unknown geometry {geometry!r}")


def diag_step(geometry: str, q: Array, t1: Array, t2: Array, eta: Float[Array, ""]) -> Array:
    """One normalised step of a diagonal factor (a vector); see the module table.

    **Arguments:** as [`dense_step`][], with `q`, `t1`, `t2` vectors (`t2` may be a scalar).

    **Returns:** the updated vector.
    """
    e = (jnp.real(t1) - jnp.real(t2)).astype(real_dtype(q.dtype))
    eta = eta.astype(e.dtype)
    if geometry == "QUAD":
        gain = 1.0 - 0.5 * eta * e
        return q * (gain * gain).astype(q.dtype)
    # EQ, QEQ, QEP and PRO coincide on diagonal matrices (they commute).
    return q - (eta * e).astype(q.dtype) * q


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
    do = jax.random.uniform(key) < jnp.asarray(probability).astype(jnp.float32)
    return jax.lax.cond(do, balance_factors, lambda f: f, factors)
