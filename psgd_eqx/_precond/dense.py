import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .._geometry import (
    GEOMETRIES,
    GeometrySpec,
    Outer,
    canonical_geometry,
    dense_lipschitz,
    dense_step,
)
from .._norms import Normaliser
from .._numerics import compute_dtype, promote, real_dtype
from .._ops import solve_upper_h
from .base import AbstractPrecond, as_shape, check_fit_pair, check_shape, flat_size, keep_if_finite


class DenseQ(AbstractPrecond):
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
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"`DenseQ(geometry=...)` unknown geometry {self.geometry!r}.")

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

    @property
    def needs_v(self) -> bool:
        return GeometrySpec(self.geometry).needs_v

    def _p_times(self, q: Array, x: Array) -> Array:
        if GeometrySpec(self.geometry).stores_p:
            return q @ x
        return jnp.conj(q.T) @ (q @ x)

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

    def update(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser | None = None,
        balance_probability: float | ArrayLike = 0.01,
    ) -> "DenseQ":
        """One Lie-group step of Q on the pair (v, h), with factored rank-1 statistics.

        **Arguments:** as [`psgd_eqx.KronQ.update`][] (`balance_probability` is unused:
        there is one factor).

        **Returns:** the updated `DenseQ` (unchanged if the step would be non-finite).
        """
        del balance_probability
        normaliser = Normaliser() if normaliser is None else normaliser
        spec = GeometrySpec(self.geometry)
        if v is None and spec.needs_v:
            raise ValueError(f"geometry {self.geometry!r} needs the probe `v` explicitly.")
        check_fit_pair("DenseQ.update", self.shape, v, h)
        cd = compute_dtype(promote(self.q.dtype, h.dtype))
        rd = real_dtype(cd)
        q = self.q.astype(cd)
        x = h.reshape(-1).astype(cd)
        vv = None if v is None else v.reshape(-1).astype(cd)
        one = jnp.ones((), rd)  # c = N/n = 1 for a single factor over the whole vector

        if spec.name == "EQ":
            b = solve_upper_h(q, vv)  # Q⁻ᴴ v
            t1, t2 = Outer((q @ x)[:, None]), Outer(b[:, None])
        else:
            pg = self._p_times(q, x)
            if spec.stats_carry_q:  # QEP: the statistics of Q·(Pg) and Q·v
                t1 = Outer((q @ pg)[:, None])
                t2 = q @ jnp.conj(q.T) if vv is None else Outer((q @ vv)[:, None])
            else:
                t1 = Outer(pg[:, None])
                t2 = one if vv is None else Outer(vv[:, None])
        k_ell, k_step = jax.random.split(key)
        ell = dense_lipschitz(t1, t2, k_ell, normaliser)
        big_l, eta = normaliser.step(self.lipschitz.astype(rd), ell, lr)
        new_q = dense_step(spec.name, q, t1, t2, eta, k_step, normaliser)
        new = DenseQ(new_q.astype(self.q.dtype), big_l.astype(self.lipschitz.dtype),
                     self.shape, self.geometry)
        return keep_if_finite(new, self, h, v)

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
