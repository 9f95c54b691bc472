import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .._geometry import GEOMETRIES, GeometrySpec, canonical_geometry, diag_lipschitz, diag_step
from .._norms import Normaliser
from .._numerics import abs2, compute_dtype, promote, real_dtype
from .base import AbstractPrecond, check_fit_pair, keep_if_finite


class DiagQ(AbstractPrecond):
    """Element-wise diagonal preconditioner Q = diag(d), P = diag(|d|²).

    One scale per parameter element (the memory of Adam's second moment), fitted with the
    same diagonal geometry rule as the diagonal factors of [`psgd_eqx.KronQ`][]. Whitening
    drives each |dᵢ|⁴ towards 1/E[gᵢ²].
    """

    d: Shaped[Array, "..."]
    lipschitz: Float[Array, ""]
    geometry: str = eqx.field(static=True)

    def __check_init__(self):
        if self.lipschitz.shape != ():
            raise ValueError(
                f"`DiagQ(lipschitz=...)` must be a scalar; got shape {self.lipschitz.shape}."
            )
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"`DiagQ(geometry=...)` unknown geometry {self.geometry!r}.")

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
    def needs_v(self) -> bool:
        return GeometrySpec(self.geometry).needs_v

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

    def update(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser | None = None,
        balance_probability: float | ArrayLike = 0.01,
    ) -> "DiagQ":
        """One fitting step of d on the pair (v, h) with the shared diagonal geometry rule.

        **Arguments:** as [`psgd_eqx.KronQ.update`][] (`key` and `balance_probability` are
        unused).

        **Returns:** the updated `DiagQ` (unchanged if the step would be non-finite).
        """
        del key, balance_probability  # a single diagonal has nothing random to do
        normaliser = Normaliser() if normaliser is None else normaliser
        spec = GeometrySpec(self.geometry)
        if v is None and spec.needs_v:
            raise ValueError(f"geometry {self.geometry!r} needs the probe `v` explicitly.")
        check_fit_pair("DiagQ.update", self.d.shape, v, h)
        cd = compute_dtype(promote(self.d.dtype, h.dtype))
        q = self.d.astype(cd)
        x = h.astype(cd)
        vv = None if v is None else v.astype(cd)
        if spec.name == "EQ":
            t1, t2 = abs2(q * x), abs2(vv / jnp.conj(q))
        else:
            pg = (q if spec.stores_p else abs2(q).astype(cd)) * x
            if spec.stats_carry_q:
                t1 = abs2(q * pg)
                t2 = abs2(q) if vv is None else abs2(q * vv)
            else:
                t1 = abs2(pg)
                t2 = jnp.ones((), real_dtype(cd)) if vv is None else abs2(vv)
        rd = real_dtype(cd)
        big_l, eta = normaliser.step(self.lipschitz.astype(rd), diag_lipschitz(t1, t2), lr)
        new_q = diag_step(spec.name, q, t1, t2, eta)
        new = DiagQ(new_q.astype(self.d.dtype), big_l.astype(self.lipschitz.dtype), self.geometry)
        return keep_if_finite(new, self, h, v)

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
