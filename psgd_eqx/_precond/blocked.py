import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Shaped

from .. import _rng
from .._norms import Normaliser
from .._shapes import (
    Pieces,
    block_groups,
    block_pieces,
    from_blocks,
    squeezed_shape,
    to_blocks,
)
from .base import AbstractPrecond, batched_update, check_shape


class BlockedQ(AbstractPrecond):
    """A block-diagonal preconditioner: the tensor is cut into blocks, each with its own
    inner preconditioner (distributed_kron's `partition_grads_into_blocks`).

    An axis of length n cut into k = ⌈n / block_size⌉ blocks gets blocks of ⌊n/k⌋ and
    ⌊n/k⌋+1 elements, so nothing is ever padded: every block is fitted on real entries
    only and equals an unblocked preconditioner of that sub-tensor. Blocks of the same
    shape are stacked and handled by one `vmap`, so a tensor has at most 2ᵇ stacks for b
    blocked axes.

    Fields: `groups` (one batched inner preconditioner per block shape), `shape` (the
    parameter's shape), `axes` (the squeezed, possibly merged, shape that is cut),
    `pieces` (per axis, `((count, size), ...)`).
    """

    groups: tuple[AbstractPrecond, ...]
    shape: tuple[int, ...] = eqx.field(static=True)
    axes: tuple[int, ...] = eqx.field(static=True)
    pieces: tuple[Pieces, ...] = eqx.field(static=True)
    # Each block's own `update` skips its non-finite steps; the other blocks still move.
    _guards_finite: ClassVar[bool] = False

    def __check_init__(self):
        if math.prod(self.axes) != math.prod(squeezed_shape(self.shape)):
            raise ValueError(f"`BlockedQ`: axes {self.axes} do not reshape shape {self.shape}.")
        if len(self.pieces) != len(self.axes) or any(
            sum(c * s for c, s in p) != n for p, n in zip(self.pieces, self.axes)
        ):
            raise ValueError(f"`BlockedQ`: pieces {self.pieces} do not tile axes {self.axes}.")
        if len(self.groups) != len(block_groups(self.pieces)):
            raise ValueError(
                f"`BlockedQ` needs one group per block shape ({len(block_groups(self.pieces))}); "
                f"got {len(self.groups)}."
            )

    @classmethod
    def init(
        cls,
        make: Callable[[tuple[int, ...]], AbstractPrecond],
        shape: tuple[int, ...],
        axes: tuple[int, ...],
        block_size: int | tuple[int | None, ...],
    ) -> "BlockedQ":
        """Cut `axes` into blocks and give each block `make(block_shape)`.

        **Arguments:**

        - `make`: builds the preconditioner of one block from its shape, e.g.
            `lambda s: KronQ.init(s)`.
        - `shape`: the parameter's shape.
        - `axes`: the squeezed (optionally merged) shape of the parameter that is cut.
        - `block_size`: the largest block length, for every axis or per axis (`None` =
            that axis is not cut).

        **Returns:** the blocked preconditioner.
        """
        shape = tuple(int(n) for n in shape)
        axes = tuple(int(n) for n in axes)
        if isinstance(block_size, int):
            block_size = (block_size,) * len(axes)
        if len(block_size) != len(axes):
            raise ValueError(
                f"`block_size` needs one entry per axis of {axes}; got {block_size!r}."
            )
        pieces = tuple(
            ((1, n),) if b is None else block_pieces(n, b) for n, b in zip(axes, block_size)
        )
        groups = []
        for group in block_groups(pieces):
            count = math.prod(pieces[i][j][0] for i, j in enumerate(group))
            one = make(tuple(pieces[i][j][1] for i, j in enumerate(group)))
            groups.append(jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), one))
        return cls(tuple(groups), shape, axes, pieces)

    @property
    def needs_v(self) -> bool:
        return self.groups[0].needs_v

    @property
    def num_blocks(self) -> int:
        """The number of blocks."""
        return sum(math.prod(self.pieces[i][j][0] for i, j in enumerate(g))
                   for g in block_groups(self.pieces))

    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """P·g, block by block.

        **Arguments:**

        - `g`: an array of the parameter's shape.

        **Returns:** P·g with the shape and dtype of `g`.
        """
        check_shape("BlockedQ.apply", self.shape, g.shape)
        blocks = to_blocks(g.reshape(self.axes), self.pieces)
        out = [jax.vmap(lambda q, x: q.apply(x))(q, b) for q, b in zip(self.groups, blocks)]
        return from_blocks(out, self.pieces, g.dtype).reshape(self.shape)

    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "BlockedQ":
        """Every block's own `update` on its block of (v, h), each with its own key."""
        hs = to_blocks(h.reshape(self.axes), self.pieces)
        vs = [None] * len(hs) if v is None else to_blocks(v.reshape(self.axes), self.pieces)
        new = []
        for q, vb, hb, k in zip(self.groups, vs, hs, _rng.split(key, len(hs))):
            keys = _rng.split(k, hb.shape[0])
            new.append(batched_update(
                q, vb, hb, keys, lambda fn, *xs: jax.vmap(fn)(*xs), lr=lr,
                normaliser=normaliser, balance_probability=balance_probability,
            ))
        return BlockedQ(tuple(new), self.shape, self.axes, self.pieces)

    def rescale(self, scale: ArrayLike) -> "BlockedQ":
        """Every block's Q ← scale·Q.

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled `BlockedQ`.
        """
        groups = tuple(jax.vmap(lambda q: q.rescale(scale))(q) for q in self.groups)
        return BlockedQ(groups, self.shape, self.axes, self.pieces)

    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P over the row-major flattened parameter (block diagonal up to a permutation).

        **Returns:** an `(N, N)` array.
        """
        n = math.prod(self.shape)
        dtype = jax.tree.leaves(self.groups)[0].dtype
        eye = jnp.eye(n, dtype=dtype).reshape(n, *self.shape)
        return jax.vmap(self.apply)(eye).reshape(n, n).T
