from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from .. import _rng
from .._geometry import (
    GeometrySpec,
    MatrixContractions,
    canonical_geometry,
    dense_lipschitz,
    dense_step,
    fit_statistics,
)
from .._norms import Normaliser
from .._numerics import compute_dtype, promote, real_dtype
from .base import AbstractGeometryPrecond, as_shape, check_shape, flat_size
from .diag import DiagQ


def _pairs(x: Array, m: int) -> Array:
    """(m, 2) pairs (x_i, x_{n−1−i}) of a flat vector."""
    return jnp.stack([x[:m], x[::-1][:m]], axis=-1)


def _unpairs(y: Array, middle: Array | None) -> Array:
    parts = [y[:, 0]] + ([] if middle is None else [middle]) + [y[::-1, 1]]
    return jnp.concatenate(parts)


def _inv_h_times(b: Array, x: Array) -> Array:
    """B⁻ᴴ x for a 2×2 block, in closed form (a batched LU is far slower on CPU)."""
    p, q, r, t = b[0, 0], b[0, 1], b[1, 0], b[1, 1]
    det = jnp.conj(p * t - q * r)
    y0 = jnp.conj(t) * x[0] - jnp.conj(r) * x[1]
    y1 = -jnp.conj(q) * x[0] + jnp.conj(p) * x[1]
    return jnp.stack([y0, y1]) / det


def _p_times(blocks: Array, x: Array, stores_p: bool) -> Array:
    """P·x for (m, 2) pairs x and (m, 2, 2) blocks."""
    y = jnp.einsum("kab,kb->ka", blocks, x)
    if stores_p:
        return y
    return jnp.einsum("kba,kb->ka", jnp.conj(blocks), y)


class XMatQ(AbstractGeometryPrecond):
    """X-shaped preconditioner Q = diag(a) + antidiag(b) over a flattened parameter.

    Element i is coupled with its mirror n−1−i only, so (after a permutation) Q is block
    diagonal with 2×2 blocks [[aᵢ, bᵢ], [b_j, a_j]]; the X-matrices form a group, and each
    block is fitted with the shared dense geometry rule (one Lipschitz estimate for all
    blocks, as in psgd_jax). Memory 2n. For odd n the middle element is a 1-element
    [`psgd_eqx.DiagQ`][].

    The default geometry `"EQ"` is psgd_jax's XMat rule (dQ = E·Q on the full X group,
    with Q⁻ᴴv from the closed-form 2×2 inverse); every other geometry works per block too.
    """

    blocks: Shaped[Array, "m 2 2"]
    lipschitz: Float[Array, ""]
    middle: DiagQ | None
    shape: tuple[int, ...] = eqx.field(static=True)
    geometry: str = eqx.field(static=True)
    _guards_finite: ClassVar[bool] = True

    def __check_init__(self):
        n = flat_size(self.shape)
        if self.blocks.shape != (n // 2, 2, 2):
            raise ValueError(
                f"`XMatQ(blocks=...)` must have shape {(n // 2, 2, 2)} for a parameter of "
                f"shape {self.shape}; got {self.blocks.shape}."
            )
        if (self.middle is None) != (n % 2 == 0):
            raise ValueError("`XMatQ(middle=...)` must be a 1-element DiagQ exactly when n is odd.")

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...] | int,
        dtype=jnp.float32,
        *,
        geometry: str = "EQ",
        init_scale: float | ArrayLike = 1.0,
    ) -> "XMatQ":
        """Q = `init_scale`·I (a = init_scale, b = 0).

        **Arguments:**

        - `shape`: the parameter's shape, or its number of elements n.
        - `dtype`: storage dtype.
        - `geometry`: one of [`psgd_eqx.GEOMETRIES`][]; default `"EQ"` (psgd_jax's XMat).
        - `init_scale`: the scale of Q.

        **Returns:** the preconditioner.
        """
        shape = as_shape(shape)
        geometry = canonical_geometry(geometry)
        n = flat_size(shape)
        if n < 1:
            raise ValueError(f"`XMatQ` needs a non-empty parameter; got shape {shape}.")
        scale = GeometrySpec(geometry).factor_scale(init_scale)
        blocks = jnp.broadcast_to(jnp.eye(2, dtype=dtype), (n // 2, 2, 2)) * scale.astype(dtype)
        middle = None
        if n % 2:
            middle = DiagQ.init((1,), dtype, geometry=geometry, init_scale=init_scale)
        lip = jnp.zeros((), real_dtype(compute_dtype(dtype)))
        return cls(blocks, lip, middle, shape, geometry)

    @property
    def a(self) -> Array:
        """The diagonal of Q (psgd_jax's `a`)."""
        m = self.blocks.shape[0]
        mid = None if self.middle is None else self.middle.d
        return _unpairs(jnp.stack([self.blocks[:, 0, 0], self.blocks[:, 1, 1]], -1)
                        if m else jnp.zeros((0, 2), self.blocks.dtype), mid)

    @property
    def b(self) -> Array:
        """The anti-diagonal of Q (psgd_jax's `b`), read from top to bottom."""
        m = self.blocks.shape[0]
        mid = None if self.middle is None else jnp.zeros((1,), self.blocks.dtype)
        return _unpairs(jnp.stack([self.blocks[:, 0, 1], self.blocks[:, 1, 0]], -1)
                        if m else jnp.zeros((0, 2), self.blocks.dtype), mid)

    def _p_times(self, blocks: Array, x: Array) -> Array:
        """P·x for (m, 2) pairs x."""
        return _p_times(blocks, x, GeometrySpec(self.geometry).stores_p)

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g over the flattened parameter.

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("XMatQ.apply", self.shape, g.shape)
        dtype = promote(self.blocks.dtype, g.dtype)
        x = g.reshape(-1).astype(dtype)
        m = self.blocks.shape[0]
        y = self._p_times(self.blocks.astype(dtype), _pairs(x, m))
        mid = None if self.middle is None else self.middle.apply(x[m : m + 1])
        return _unpairs(y, mid).reshape(g.shape).astype(g.dtype)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "XMatQ":
        """Every 2×2 block's step under one shared L (psgd_jax), then the middle element's
        own guarded `DiagQ.update` (`balance_probability` is unused)."""
        del balance_probability
        spec = GeometrySpec(self.geometry)
        cd = compute_dtype(promote(self.blocks.dtype, h.dtype))
        rd = real_dtype(cd)
        m = self.blocks.shape[0]
        blocks = self.blocks.astype(cd)
        hf = h.reshape(-1).astype(cd)
        vf = None if v is None else v.reshape(-1).astype(cd)
        vp = None if vf is None else _pairs(vf, m)
        k_ell, k_step, k_mid = _rng.split(key, 3)

        def stats(b, xk, vk):
            ops = MatrixContractions(b, spec.stores_p, _inv_h_times)
            ((t1, t2),) = fit_statistics(spec.name, ops, xk, vk)
            return t1, t2

        t1, t2 = jax.vmap(stats, in_axes=(0, 0, None if vp is None else 0))(
            blocks, _pairs(hf, m), vp
        )
        # One L for all blocks: the largest of their norm bounds.
        ells = jax.vmap(lambda a, b: dense_lipschitz(a, b, k_ell, normaliser))(t1, t2)
        ell = jnp.max(ells) if m else jnp.zeros((), rd)
        big_l, eta = normaliser.step(self.lipschitz.astype(rd), ell, lr)
        # EQ moves on the whole X group (psgd_jax's rule): each block's inverse is closed-
        # form, so E is not restricted to its upper triangle as for a Kron factor.
        new_blocks = jax.vmap(
            lambda b, a1, a2: dense_step(
                spec.name, b, a1, a2, eta, k_step, normaliser, triangular=False
            )
        )(blocks, t1, t2)
        middle = self.middle
        if middle is not None:
            mid_v = None if vf is None else vf[m : m + 1]
            middle = middle.update(mid_v, hf[m : m + 1], lr=lr, key=k_mid, normaliser=normaliser)
        return XMatQ(new_blocks.astype(self.blocks.dtype), big_l.astype(self.lipschitz.dtype),
                     middle, self.shape, self.geometry)

    def rescale(self, scale: ArrayLike) -> "XMatQ":
        """Q ← scale·Q.

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `XMatQ`.
        """
        s = GeometrySpec(self.geometry).factor_scale(scale).astype(self.blocks.dtype)
        middle = None if self.middle is None else self.middle.rescale(scale)
        return XMatQ(self.blocks * s, self.lipschitz, middle,
                     self.shape, self.geometry)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P as a dense matrix over the flattened parameter.

        **Returns:** an `(N, N)` array.
        """
        n = flat_size(self.shape)
        eye = jnp.eye(n, dtype=compute_dtype(self.blocks.dtype))
        return jax.vmap(lambda col: self.apply(col.reshape(self.shape)).reshape(-1),
                        in_axes=1, out_axes=1)(eye)
