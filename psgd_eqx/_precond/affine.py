from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Shaped

from .._norms import Normaliser
from .._shapes import affine_dense_sides, matrix_view, squeezed_shape
from .base import AbstractGeometryPrecond, check_shape
from .kron import KronQ


class AffineQ(AbstractGeometryPrecond):
    """Affine-group preconditioner: Q = Q_left ⊗ Q_right on the parameter seen as a matrix.

    The seed's `affine` (psgd_jax): scalars and vectors are a `(1, n)` row, matrices stay,
    higher-order tensors are transposed and reshaped to the (m, k) matrix with the smallest
    two-factor memory m² + k² (the identity order winning ties). Each side is dense
    (triangular for `EQ`) or diagonal by `max_size_triangular`/`max_skew_triangular`. All
    the maths is a two-factor [`psgd_eqx.KronQ`][] (field `kron`) on that matrix, so every
    geometry works.
    """

    kron: KronQ
    shape: tuple[int, ...] = eqx.field(static=True)
    perm: tuple[int, ...] = eqx.field(static=True)
    # The KronQ's own `update` skips a non-finite step (the same all-or-nothing guard).
    _guards_finite: ClassVar[bool] = False

    def __check_init__(self):
        if len(self.kron.shape) != 2:
            raise ValueError(
                f"`AffineQ(kron=...)` must act on a matrix; got {self.kron.shape}."
            )
        if sorted(self.perm) != list(range(len(self.shape))):
            raise ValueError(
                f"`AffineQ(perm=...)` must permute {len(self.shape)} axes; got {self.perm}."
            )

    @classmethod
    def init(
        cls,
        shape: tuple[int, ...],
        dtype=jnp.float32,
        *,
        max_size_triangular: float = 4096,
        max_skew_triangular: float = 128,
        dense: tuple[bool, bool] | None = None,
        geometry: str = "PRO",
        init_scale: float | ArrayLike = 1.0,
    ) -> "AffineQ":
        """Q = `init_scale`·I for a parameter of the given shape.

        **Arguments:**

        - `shape`: the parameter's shape (any rank).
        - `dtype`: storage dtype of the factors.
        - `max_size_triangular`: sides longer than this are diagonal (psgd_jax: 4096).
        - `max_skew_triangular`: a side more than this many times longer than the other is
            diagonal (psgd_jax: 128).
        - `dense`: `(left, right)` flags overriding the two rules.
        - `geometry`: one of [`psgd_eqx.GEOMETRIES`][].
        - `init_scale`: the scale of Q.

        **Returns:** the preconditioner.
        """
        shape = tuple(int(n) for n in shape)
        perm, mat = matrix_view(shape)
        if dense is None:
            dense = affine_dense_sides(mat, max_size_triangular, max_skew_triangular)
        flags = tuple(d for d, n in zip(dense, mat) if n != 1) or (False,)
        if len(squeezed_shape(mat)) != len(flags):
            flags = (False,)
        kron = KronQ.init(mat, dtype, dense=flags, geometry=geometry, init_scale=init_scale)
        return cls(kron, shape, perm)

    @property
    def geometry(self) -> str:
        """The geometry of the underlying `KronQ`."""
        return self.kron.geometry

    def _to_matrix(self, x: Array) -> Array:
        return jnp.transpose(x, self.perm).reshape(self.kron.shape)

    def _from_matrix(self, y: Array) -> Array:
        permuted = tuple(self.shape[j] for j in self.perm)
        inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
        return jnp.transpose(y.reshape(permuted), inv)

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g on the matrix view of `g`.

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("AffineQ.apply", self.shape, g.shape)
        return self._from_matrix(self.kron.apply(self._to_matrix(g)))

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "AffineQ":
        """The `KronQ`'s `update` on the matrix view of the pair."""
        vm = None if v is None else self._to_matrix(v)
        kron = self.kron.update(
            vm,
            self._to_matrix(h),
            lr=lr,
            key=key,
            normaliser=normaliser,
            balance_probability=balance_probability,
        )
        return AffineQ(kron, self.shape, self.perm)

    def rescale(self, scale: ArrayLike) -> "AffineQ":
        """Q ← scale·Q.

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `AffineQ`.
        """
        return AffineQ(self.kron.rescale(scale), self.shape, self.perm)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P over the row-major flattening of the *original* parameter.

        **Returns:** an `(N, N)` array.
        """
        p = self.kron.as_matrix()
        n = p.shape[0]
        # P acts on the matrix view; conjugate by the permutation of flat indices.
        idx = self._to_matrix(jnp.arange(n).reshape(self.shape)).reshape(-1)
        out = jnp.zeros_like(p)
        return out.at[idx[:, None], idx[None, :]].set(p)
