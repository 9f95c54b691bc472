from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .._geometry import (
    AbstractContractions,
    GeometrySpec,
    Statistic,
    canonical_geometry,
    fit_factor,
    fit_statistics,
)
from .._norms import Normaliser
from .._numerics import abs2, compute_dtype, promote, real_dtype
from .base import AbstractGeometryPrecond


class _DiagContractions(AbstractContractions):
    """`DiagQ`'s primitives: one diagonal factor with nothing to contract over (c = 1)."""

    q: Array
    stores_p: bool = eqx.field(static=True)

    @property
    def num_factors(self) -> int:
        return 1

    def p_times(self, x: Array) -> Array:
        return (self.q if self.stores_p else abs2(self.q).astype(x.dtype)) * x

    def factor_times(self, i: int, x: Array) -> Array:
        return self.q * x

    def factor_inv_h_times(self, i: int, x: Array) -> Array:
        return x / jnp.conj(self.q)

    def contract(self, i: int, x: Array) -> Statistic:
        return abs2(x)

    def factor_gram(self, i: int) -> Array:
        return abs2(self.q)

    def whitening_scale(self, i: int) -> Float[Array, ""]:
        return jnp.ones((), real_dtype(self.q.dtype))


class DiagQ(AbstractGeometryPrecond):
    """Element-wise diagonal preconditioner Q = diag(d), P = diag(|d|²).

    One scale per parameter element (the memory of Adam's second moment), fitted with the
    same diagonal geometry rule as the diagonal factors of [`psgd_eqx.KronQ`][]. Whitening
    drives each |dᵢ|⁴ towards 1/E[gᵢ²].
    """

    d: Shaped[Array, "..."]
    lipschitz: Float[Array, ""]
    geometry: str = eqx.field(static=True)
    _guards_finite: ClassVar[bool] = True

    def __check_init__(self):
        if self.lipschitz.shape != ():
            raise ValueError(
                f"`DiagQ(lipschitz=...)` must be a scalar; got shape {self.lipschitz.shape}."
            )

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...],
        dtype=jnp.float32,
        *,
        geometry: str = "PRO",
        init_scale: float | ArrayLike = 1.0,
    ) -> "DiagQ":
        """Q = `init_scale`·I for a parameter of the given shape.

        **Arguments:**

        - `shape`: the parameter's shape.
        - `dtype`: storage dtype of d.
        - `geometry`: any geometry name; on a diagonal all but `QUAD`/`QUAD4P` give the
            same step (`PRO4P`/`QUAD4P` store the diagonal of P itself).
        - `init_scale`: the initial value of every dᵢ.

        **Returns:** the preconditioner.
        """
        geometry = canonical_geometry(geometry)
        scale = GeometrySpec(geometry).factor_scale(init_scale)
        d = jnp.full(tuple(shape), scale.astype(dtype), dtype)
        return cls(d, jnp.zeros((), real_dtype(compute_dtype(dtype))), geometry)

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape (that of `d`)."""
        return self.d.shape

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g = |d|²⊙g.

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        if g.shape != self.d.shape:
            raise ValueError(f"`DiagQ.apply` expects shape {self.d.shape}; got {g.shape}.")
        dtype = promote(self.d.dtype, g.dtype)
        return (self._p().astype(dtype) * g.astype(dtype)).astype(g.dtype)

    def _p(self) -> Array:
        """The diagonal of P: |d|², or d itself for the stored-P geometries."""
        return self.d if GeometrySpec(self.geometry).stores_p else abs2(self.d)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "DiagQ":
        """d's step with the shared diagonal rule (`balance_probability` is unused)."""
        del balance_probability  # a single diagonal has no factors to balance
        cd = compute_dtype(promote(self.d.dtype, h.dtype))
        q = self.d.astype(cd)
        spec = GeometrySpec(self.geometry)
        ops = _DiagContractions(q, spec.stores_p)
        vv = None if v is None else v.astype(cd)
        ((t1, t2),) = fit_statistics(spec.name, ops, h.astype(cd), vv)
        old_l = self.lipschitz.astype(real_dtype(cd))
        new_q, big_l = fit_factor(spec.name, q, t1, t2, old_l, lr, key, normaliser, dense=False)
        return DiagQ(new_q.astype(self.d.dtype), big_l.astype(self.lipschitz.dtype), self.geometry)

    def rescale(self, scale: ArrayLike) -> "DiagQ":
        """d ← scale·d.

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `DiagQ`.
        """
        s = GeometrySpec(self.geometry).factor_scale(scale).astype(self.d.dtype)
        return DiagQ(self.d * s, self.lipschitz, self.geometry)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P = diag(|d|²) over the flattened parameter.

        **Returns:** an `(N, N)` array.
        """
        return jnp.diag(self._p().astype(compute_dtype(self.d.dtype)).reshape(-1))
