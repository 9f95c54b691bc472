from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .._geometry import (
    GeometrySpec,
    MatrixContractions,
    canonical_geometry,
    fit_factor,
    fit_statistics,
)
from .._norms import Normaliser
from .._numerics import compute_dtype, promote, real_dtype
from .._ops import solve_upper_h
from .base import AbstractGeometryPrecond, as_shape, check_shape, flat_size


def _p_times(q: Array, x: Array, stores_p: bool) -> Array:
    """P·x for one dense factor: QᴴQx, or Qx when the factor is P itself."""
    return q @ x if stores_p else jnp.conj(q.T) @ (q @ x)


class DenseQ(AbstractGeometryPrecond):
    """One dense n×n Q over a whole (small) parameter vector: P = QᴴQ ≈ H⁻¹.

    The reference's `DenseNewton`, a BFGS alternative for up to ~10⁴ parameters with no
    line search. Every geometry of [`psgd_eqx.GEOMETRIES`][] applies (upper-triangular Q
    for `EQ`; the factor is P itself for `PRO4P`/`QUAD4P`). A fit step on one (v, h) pair
    has rank-1 statistics, kept factored: a refit costs O(n²) for `EQ`, `QEQ`, `QUAD`,
    `QUAD4P` and Newton-fitted `QEP`, and O(n³) for the Procrustes rotation of
    `PRO`/`PRO4P` (as in the reference) and for whitening-fitted `QEP` (its T₂ = QQᴴ).

    The parameter may have any shape; Q acts on its row-major flattening. Give it the
    concatenation of several leaves through `scale_by_psgd(global_structure=...)`.
    """

    q: Shaped[Array, "n n"]
    lipschitz: Float[Array, ""]
    shape: tuple[int, ...] = eqx.field(static=True)
    geometry: str = eqx.field(static=True)
    _guards_finite: ClassVar[bool] = True

    def __check_init__(self):
        n = flat_size(self.shape)
        if self.q.shape != (n, n):
            raise ValueError(
                f"`DenseQ(q=...)` must have shape {(n, n)} for a parameter of shape "
                f"{self.shape}; got {self.q.shape}."
            )
        if self.lipschitz.shape != ():
            raise ValueError(
                f"`DenseQ(lipschitz=...)` must be a scalar; got {self.lipschitz.shape}."
            )

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...] | int,
        dtype=jnp.float32,
        *,
        geometry: str = "PRO",
        init_scale: float | ArrayLike = 1.0,
    ) -> "DenseQ":
        """Q = `init_scale`·I over a parameter of the given shape (or size).

        **Arguments:**

        - `shape`: the parameter's shape, or its number of elements n.
        - `dtype`: storage dtype of Q.
        - `geometry`: one of [`psgd_eqx.GEOMETRIES`][] (or `"Q0.5EQ1.5"` for `"PRO"`).
        - `init_scale`: the scale of Q (P = init_scale²·I).

        **Returns:** the preconditioner.
        """
        shape = as_shape(shape)
        geometry = canonical_geometry(geometry)
        n = flat_size(shape)
        if n < 1:
            raise ValueError(f"`DenseQ` needs a non-empty parameter; got shape {shape}.")
        q = jnp.eye(n, dtype=dtype) * GeometrySpec(geometry).factor_scale(init_scale).astype(dtype)
        return cls(q, jnp.zeros((), real_dtype(compute_dtype(dtype))), shape, geometry)

    def _p_times(self, q: Array, x: Array) -> Array:
        return _p_times(q, x, GeometrySpec(self.geometry).stores_p)

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g over the flattened parameter.

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("DenseQ.apply", self.shape, g.shape)
        dtype = promote(self.q.dtype, g.dtype)
        x = g.reshape(-1).astype(dtype)
        return self._p_times(self.q.astype(dtype), x).reshape(g.shape).astype(g.dtype)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "DenseQ":
        """Q's step on factored rank-1 statistics (`balance_probability` is unused)."""
        del balance_probability  # one factor: nothing to balance
        cd = compute_dtype(promote(self.q.dtype, h.dtype))
        q = self.q.astype(cd)
        spec = GeometrySpec(self.geometry)
        vv = None if v is None else v.reshape(-1).astype(cd)
        ops = MatrixContractions(q, spec.stores_p, solve_upper_h)
        ((t1, t2),) = fit_statistics(spec.name, ops, h.reshape(-1).astype(cd), vv)
        old_l = self.lipschitz.astype(real_dtype(cd))
        new_q, big_l = fit_factor(spec.name, q, t1, t2, old_l, lr, key, normaliser, dense=True)
        return DenseQ(new_q.astype(self.q.dtype), big_l.astype(self.lipschitz.dtype),
                      self.shape, self.geometry)

    def rescale(self, scale: ArrayLike) -> "DenseQ":
        """Q ← scale·Q (the stored P ← scale²·P for `PRO4P`/`QUAD4P`).

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `DenseQ`.
        """
        s = GeometrySpec(self.geometry).factor_scale(scale).astype(self.q.dtype)
        return DenseQ(self.q * s, self.lipschitz, self.shape, self.geometry)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P as a dense matrix over the flattened parameter.

        **Returns:** an `(N, N)` array.
        """
        q = self.q.astype(compute_dtype(self.q.dtype))
        return q if GeometrySpec(self.geometry).stores_p else jnp.conj(q.T) @ q
