from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Shaped

from .. import _rng
from .._norms import Normaliser
from .base import AbstractPrecond, batched_update, check_shape


class StackedQ(AbstractPrecond):
    """One preconditioner per slice of a leading *stack* axis: scanned/stacked layers.

    A parameter of shape `(L, *s)` built by `eqx.filter_vmap` (and run with `lax.scan`)
    holds L layers; it gets L independent preconditioners of shape `s`, stored as one
    `inner` module whose arrays carry the leading axis L. `apply` and `update` `vmap` over
    it, or, with `map_batch_size`, run `lax.map` over batches of that many layers, which
    bounds the peak memory of a refit (distributed_kron's `lax_map_scanned_layers`).

    Fields: `inner` (the batched preconditioner), `shape` (the full parameter shape),
    `map_batch_size` (static; `None` = one `vmap` over all layers).
    """

    inner: AbstractPrecond
    shape: tuple[int, ...] = eqx.field(static=True)
    map_batch_size: int | None = eqx.field(static=True, default=None)
    # Each layer's own `update` skips its non-finite steps; the other layers still move.
    _guards_finite: ClassVar[bool] = False

    def __check_init__(self):
        if len(self.shape) < 1 or self.shape[0] < 1:
            raise ValueError(f"`StackedQ` needs a leading stack axis; got shape {self.shape}.")
        if self.map_batch_size is not None and (
            isinstance(self.map_batch_size, bool)
            or not isinstance(self.map_batch_size, int)
            or self.map_batch_size < 1
        ):
            raise ValueError(
                f"`lax_map_batch_size` must be an int >= 1 or None; got {self.map_batch_size!r}."
            )

    @classmethod
    def init(
        cls,
        make: Callable[[tuple[int, ...]], AbstractPrecond],
        shape: tuple[int, ...],
        *,
        map_batch_size: int | None = None,
    ) -> "StackedQ":
        """L copies of `make(shape[1:])`, stacked along a new leading axis.

        **Arguments:**

        - `make`: builds the preconditioner of one layer from its shape, e.g.
            `lambda s: KronQ.init(s)`.
        - `shape`: the stacked parameter's shape `(L, *s)`.
        - `map_batch_size`: `None` to `vmap` over all L layers, or a batch size for
            `lax.map` (less peak memory, more sequential).

        **Returns:** the stacked preconditioner.
        """
        shape = tuple(int(n) for n in shape)
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(
                f"`scanned_layers` needs a leading stack axis of size >= 1; got shape {shape}."
            )
        one = make(shape[1:])
        inner = jax.tree.map(lambda x: jnp.broadcast_to(x, (shape[0], *x.shape)), one)
        return cls(inner, shape, map_batch_size)

    @property
    def needs_v(self) -> bool:
        return self.inner.needs_v

    @property
    def layers(self) -> int:
        """L, the number of stacked layers."""
        return self.shape[0]

    def _map(self, fn, *xs):
        """fn over the layers: `vmap`, or `lax.map` in batches of `map_batch_size`."""
        if self.map_batch_size is None:
            return jax.vmap(fn)(*xs)
        return jax.lax.map(lambda args: fn(*args), xs, batch_size=self.map_batch_size)

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g, layer by layer.

        **Arguments:**

        - `g`: an array of the stacked parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("StackedQ.apply", self.shape, g.shape)
        return self._map(lambda q, x: q.apply(x), self.inner, g)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "StackedQ":
        """Every layer's own `update` on its slice of (v, h), each with its own key."""
        keys = _rng.split(key, self.layers)
        inner = batched_update(self.inner, v, h, keys, self._map, lr=lr,
                               normaliser=normaliser, balance_probability=balance_probability)
        return StackedQ(inner, self.shape, self.map_batch_size)

    def rescale(self, scale: ArrayLike) -> "StackedQ":
        """Every layer's Q ← scale·Q.

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `StackedQ`.
        """
        inner = jax.vmap(lambda q: q.rescale(scale))(self.inner)
        return StackedQ(inner, self.shape, self.map_batch_size)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P over the flattened stacked parameter: block diagonal, one block per layer.

        **Returns:** an `(N, N)` array.
        """
        blocks = jax.vmap(lambda q: q.as_matrix())(self.inner)
        return jax.scipy.linalg.block_diag(*blocks)
