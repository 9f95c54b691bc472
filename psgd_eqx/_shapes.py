"""Shapes: which axes get a factor, the matrix view of a tensor, blocks of an axis.

Pure functions of shapes (arrays only in `to_blocks`/`from_blocks`); the structures and
the planner both read them from here.
"""

import itertools
import math

import jax.numpy as jnp
from jaxtyping import Array


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes that get a factor: size-1 axes are dropped; a scalar (or all-ones shape) is
    treated as a length-1 vector with one diagonal factor."""
    sq = tuple(int(n) for n in shape if n != 1)
    if not sq:
        return (1,)
    return sq


def matrix_view(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, int]]:
    """How an affine preconditioner sees a tensor as a matrix (psgd_jax's rule).

    Scalars and vectors become a `(1, n)` row; matrices stay; a higher-order tensor is
    transposed and reshaped to the `(m, k)` matrix with the smallest m² + k² (the memory of
    two dense factors) over all axis orders and split points, the identity order winning
    ties. Tensors of more than 6 axes only try split points of their own order.

    **Arguments:**

    - `shape`: the parameter's shape.

    **Returns:** `(perm, (m, k))`: transpose the tensor by `perm`, then reshape to `(m, k)`.
    """
    shape = tuple(int(n) for n in shape)
    ident = tuple(range(len(shape)))
    if len(shape) < 2:
        return ident, (1, math.prod(shape))
    if len(shape) == 2:
        return ident, (shape[0], shape[1])
    orders = itertools.permutations(ident) if len(shape) <= 6 else [ident]
    best = None
    for perm in orders:
        s = [shape[j] for j in perm]
        for i in range(1, len(s)):
            m, k = math.prod(s[:i]), math.prod(s[i:])
            if best is None or m * m + k * k < best[0]:
                best = (m * m + k * k, tuple(perm), (m, k))
    return best[1], best[2]


def affine_dense_sides(
    matrix_shape: tuple[int, int], max_size_triangular: float, max_skew_triangular: float
) -> tuple[bool, bool]:
    """psgd_jax's affine rule: a side of size s (the other side t) is diagonal when
    s < 2, s > `max_size_triangular` or s > `max_skew_triangular`·t; dense otherwise.

    **Arguments:**

    - `matrix_shape`: `(m, k)` from `matrix_view`.
    - `max_size_triangular`, `max_skew_triangular`: the rule's thresholds.

    **Returns:** `(left_dense, right_dense)`.
    """
    m, k = matrix_shape
    for name, val in (("max_size_triangular", max_size_triangular),
                      ("max_skew_triangular", max_skew_triangular)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not val >= 0:
            raise ValueError(f"`{name}` must be a number >= 0; got {val!r}.")

    def dense(s, t):
        return not (s < 2 or s > max_size_triangular or s > max_skew_triangular * t)

    return dense(m, k), dense(k, m)


def block_pieces(n: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Cut an axis of length n into k = ⌈n / block_size⌉ blocks of (almost) equal length.

    **Returns:** `((count, size), ...)`: `n % k` blocks of ⌊n/k⌋+1 then the rest of
    ⌊n/k⌋ (one piece if k divides n), so no padding is ever needed.
    """
    k = -(-n // block_size)
    size, extra = divmod(n, k)
    pieces = ((extra, size + 1),) if extra else ()
    return pieces + ((k - extra, size),)


# One axis cut into blocks: ((count, size), ...) with at most two sizes, largest first.
Pieces = tuple[tuple[int, int], ...]


def block_groups(pieces: tuple[Pieces, ...]) -> list[tuple[int, ...]]:
    """Every combination of one piece per axis: the block shapes that occur."""
    return list(itertools.product(*(range(len(p)) for p in pieces)))


def _region(pieces: tuple[Pieces, ...], group: tuple[int, ...]) -> tuple[slice, ...]:
    """The contiguous slice of the tensor tiled by the blocks of `group`."""
    out = []
    for axis_pieces, j in zip(pieces, group):
        start = sum(c * s for c, s in axis_pieces[:j])
        c, s = axis_pieces[j]
        out.append(slice(start, start + c * s))
    return tuple(out)


def to_blocks(x: Array, pieces: tuple[Pieces, ...]) -> list[Array]:
    """Cut `x` (shape = the blocked axes) into one `(count, *block_shape)` stack per group."""
    k = x.ndim
    out = []
    for group in block_groups(pieces):
        counts = [pieces[i][j][0] for i, j in enumerate(group)]
        sizes = [pieces[i][j][1] for i, j in enumerate(group)]
        r = x[_region(pieces, group)]
        r = r.reshape([n for cs in zip(counts, sizes) for n in cs])
        r = r.transpose([2 * i for i in range(k)] + [2 * i + 1 for i in range(k)])
        out.append(r.reshape(math.prod(counts), *sizes))
    return out


def from_blocks(blocks: list[Array], pieces: tuple[Pieces, ...], dtype) -> Array:
    """The inverse of `to_blocks`."""
    shape = tuple(sum(c * s for c, s in p) for p in pieces)
    k = len(shape)
    x = jnp.zeros(shape, dtype)
    for b, group in zip(blocks, block_groups(pieces)):
        counts = [pieces[i][j][0] for i, j in enumerate(group)]
        sizes = [pieces[i][j][1] for i, j in enumerate(group)]
        r = b.reshape(*counts, *sizes)
        r = r.transpose([i for pair in zip(range(k), range(k, 2 * k)) for i in pair])
        x = x.at[_region(pieces, group)].set(r.reshape([c * s for c, s in zip(counts, sizes)]))
    return x
