"""The one tiled, batched product every op is built from, for Pallas Triton (GPU) and Mosaic TPU.

    out[b] = epilogue(op(A)[b] @ op(B)[b])

with, all static:

- `op(·)` the identity or a transpose (the operand is read transposed, never copied);
- a triangular structure of `op(A)` and/or `op(B)`: tiles of the contraction that are zero
  are skipped (a `pl.when`/loop-bound restriction), tiles that straddle the diagonal are
  masked, so the strictly other triangle of the input is ignored. On GPU the masked steps
  are peeled off the main loop, whose operands go from memory to the matrix unit unchanged
  (an elementwise op between load and dot defeats Triton's software pipelining);
- optionally, A given as a difference A₁ − A₂ formed per tile in f32 (`a_diff`), which saves
  the launch and the HBM round trip of materialising it (the `EQ` update's T₁ − T₂);
- the epilogue `c₀X₀ + c₁X₁ + c₂·acc` with per-matrix scalars c and same-shaped tiles X, a
  row scale and a column scale (diagonal Kronecker factors), and a triangular output mask.

All products accumulate in f32 (`preferred_element_type`). Operands of the same dtype go to
the matrix unit as they are (bf16·bf16 → f32); mixed operands are both cast to f32.
Every array is already padded to block multiples and has a leading batch dim.
"""

import dataclasses
import functools as ft
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._blocks import BlockSizes


@dataclasses.dataclass(frozen=True)
class ProductSpec:
    """Static description of one product (see the module docstring)."""

    trans_a: bool = False
    trans_b: bool = False
    a_tri: str | None = None  # "upper" | "lower": structure of op(A)
    b_tri: str | None = None  # structure of op(B)
    out_tri: str | None = None  # mask of the output
    n_extra: int = 0  # number of epilogue tiles X
    has_coef: bool = False  # epilogue coefficients (B, 4): c0, c1, c2, unused
    row_scale: bool = False
    col_scale: bool = False
    a_diff: bool = False  # A arrives as (A₁, A₂), op(A) = A₁ − A₂


def dot_f32(a, b, precision):
    """a @ b accumulated in f32, with the dtype rule of the module docstring."""
    if a.dtype != b.dtype:
        a = a.astype(jnp.float32)
        b = b.astype(jnp.float32)
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _tri_mask(x, row0, col0, kind):
    if kind is None:
        return x
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    keep = cols >= rows if kind == "upper" else cols <= rows
    return jnp.where(keep, x, jnp.zeros_like(x))


def _k_range(spec: ProductSpec, i, j, bm: int, bn: int, bk: int, nk: int):
    """[lo, hi) of the contraction blocks that can be non-zero for output tile (i, j)."""
    lo, hi = 0, nk
    if spec.a_tri == "upper":  # op(A)[r, k] = 0 for k < r
        lo = jnp.maximum(lo, (i * bm) // bk)
    elif spec.a_tri == "lower":  # op(A)[r, k] = 0 for k > r
        hi = jnp.minimum(hi, ((i + 1) * bm - 1) // bk + 1)
    if spec.b_tri == "upper":  # op(B)[k, c] = 0 for k > c
        hi = jnp.minimum(hi, ((j + 1) * bn - 1) // bk + 1)
    elif spec.b_tri == "lower":  # op(B)[k, c] = 0 for k < c
        lo = jnp.maximum(lo, (j * bn) // bk)
    return lo, hi


def _mask_split(spec: ProductSpec, i, j, bm: int, bn: int, bk: int, lo, hi):
    """[lo, p1) and [p2, hi): contraction blocks whose operand tiles straddle a diagonal."""
    p1, p2 = lo, hi
    if spec.a_tri == "upper":  # op(A) tile fully upper from k0 ≥ r0 + bm − 1 on
        p1 = jnp.maximum(p1, ((i + 1) * bm + bk - 2) // bk)
    elif spec.a_tri == "lower":  # fully lower while k0 + bk − 1 ≤ r0
        p2 = jnp.minimum(p2, (i * bm + 1) // bk)
    if spec.b_tri == "lower":  # op(B) tile fully lower from k0 ≥ c0 + bn − 1 on
        p1 = jnp.maximum(p1, ((j + 1) * bn + bk - 2) // bk)
    elif spec.b_tri == "upper":  # fully upper while k0 + bk − 1 ≤ c0
        p2 = jnp.minimum(p2, (j * bn + 1) // bk)
    p1 = jnp.minimum(jnp.maximum(p1, lo), hi)
    p2 = jnp.minimum(jnp.maximum(p2, p1), hi)
    return p1, p2


def _a_tile(parts, spec, row0, k0, masked: bool = True):
    """op(A) tile (bm, bk) from the loaded tile(s) (transposed if read transposed)."""
    a = parts[0] if len(parts) == 1 else parts[0].astype(jnp.float32) - parts[1].astype(jnp.float32)
    if spec.trans_a:
        a = a.T
    return _tri_mask(a, row0, k0, spec.a_tri) if masked else a


def _b_tile(b, spec, k0, col0, masked: bool = True):
    if spec.trans_b:
        b = b.T
    return _tri_mask(b, k0, col0, spec.b_tri) if masked else b


def _epilogue(acc, spec, coef, xs, rs, cs, row0, col0):
    """coef: a callable idx -> f32 scalar (or None); xs: loaded X tiles; rs/cs: scales."""
    if spec.has_coef:
        out = coef(2) * acc
        for idx, x in enumerate(xs):
            out = out + coef(idx) * x.astype(jnp.float32)
    else:
        out = acc
        for x in xs:
            out = out + x.astype(jnp.float32)
    if rs is not None:
        out = out * rs.astype(jnp.float32)
    if cs is not None:
        out = out * cs.astype(jnp.float32)
    return _tri_mask(out, row0, col0, spec.out_tri)


def _unpack(refs, spec, extra_scratch: int = 0):
    it = iter(refs)
    coef_ref = next(it) if spec.has_coef else None
    a_refs = tuple(next(it) for _ in range(2 if spec.a_diff else 1))
    b_ref = next(it)
    x_refs = [next(it) for _ in range(spec.n_extra)]
    rs_ref = next(it) if spec.row_scale else None
    cs_ref = next(it) if spec.col_scale else None
    o_ref = next(it)
    scratch = [next(it) for _ in range(extra_scratch)]
    return coef_ref, a_refs, b_ref, x_refs, rs_ref, cs_ref, o_ref, scratch


# -- GPU (Pallas Triton) ------------------------------------------------------------------
# Grid (batch, M/bm, N/bn); each program owns one output tile and loops over the
# contraction inside the kernel (Triton programs run in parallel, so a reduction grid axis
# cannot accumulate). Operands arrive as full-depth panels and are sliced per step.


def _gpu_kernel(*refs, spec: ProductSpec, bm: int, bn: int, bk: int, nk: int, precision):
    coef_ref, a_refs, b_ref, x_refs, rs_ref, cs_ref, o_ref, _ = _unpack(refs, spec)
    i, j = pl.program_id(1), pl.program_id(2)
    row0, col0 = i * bm, j * bn

    def steps(start, stop, masked, acc):
        def body(kk, acc):
            k0 = pl.multiple_of(kk * bk, bk)
            a = [r[pl.ds(k0, bk), :] if spec.trans_a else r[:, pl.ds(k0, bk)] for r in a_refs]
            b = b_ref[:, pl.ds(k0, bk)] if spec.trans_b else b_ref[pl.ds(k0, bk), :]
            a = _a_tile(a, spec, row0, k0, masked)
            b = _b_tile(b, spec, k0, col0, masked)
            return acc + dot_f32(a, b, precision)

        return jax.lax.fori_loop(start, stop, body, acc)

    acc = jnp.zeros((bm, bn), jnp.float32)
    if spec.a_tri is None and spec.b_tri is None:
        acc = steps(0, nk, False, acc)
    else:
        lo, hi = _k_range(spec, i, j, bm, bn, bk, nk)
        p1, p2 = _mask_split(spec, i, j, bm, bn, bk, lo, hi)
        acc = steps(lo, p1, True, acc)
        acc = steps(p1, p2, False, acc)
        acc = steps(p2, hi, True, acc)
    coef = (lambda idx: coef_ref[idx]) if spec.has_coef else None
    xs = [x[...] for x in x_refs]
    rs = rs_ref[...] if spec.row_scale else None
    cs = cs_ref[...] if spec.col_scale else None
    out = _epilogue(acc, spec, coef, xs, rs, cs, row0, col0)
    o_ref[...] = out.astype(o_ref.dtype)


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _gpu_product(a, b, xs, coef, rs, cs, *, spec, blocks, bm, bn, bk, precision, out_dtype,
                 interpret, name):
    nb, m, n, kdim = _dims(a, b, spec)
    nk = kdim // bk
    if spec.trans_a:
        a_spec = pl.BlockSpec((None, kdim, bm), lambda z, i, j: (z, 0, i))
    else:
        a_spec = pl.BlockSpec((None, bm, kdim), lambda z, i, j: (z, i, 0))
    if spec.trans_b:
        b_spec = pl.BlockSpec((None, bn, kdim), lambda z, i, j: (z, j, 0))
    else:
        b_spec = pl.BlockSpec((None, kdim, bn), lambda z, i, j: (z, 0, j))
    tile = pl.BlockSpec((None, bm, bn), lambda z, i, j: (z, i, j))
    in_specs, args = _operands(
        spec, a, b, xs, coef, rs, cs, a_spec=a_spec, b_spec=b_spec, tile=tile,
        coef_spec=pl.BlockSpec((None, 4), lambda z, i, j: (z, 0)),
        rs_spec=pl.BlockSpec((None, bm, 1), lambda z, i, j: (z, i, 0)),
        cs_spec=pl.BlockSpec((None, 1, bn), lambda z, i, j: (z, 0, j)),
    )
    kernel = ft.partial(_gpu_kernel, spec=spec, bm=bm, bn=bn, bk=bk, nk=nk, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb, m, n), out_dtype),
        grid=(nb, m // bm, n // bn),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=_triton_params(blocks.warps(bm, bn), blocks.stages()),
        interpret=interpret,
        name=name,
    )(*args)


# -- TPU (Mosaic) ---------------------------------------------------------------------------
# Grid (batch, M/bm, N/bn, K/bk) with the contraction last ("arbitrary") and an f32 VMEM
# accumulator. Contraction blocks outside the non-zero range of a triangular operand are
# skipped: their index map is clamped into the range (an unchanged block index is not
# re-fetched) and their step is a no-op.


def _tpu_kernel(*refs, spec: ProductSpec, bm: int, bn: int, bk: int, nk: int, precision):
    coef_ref, a_refs, b_ref, x_refs, rs_ref, cs_ref, o_ref, (acc_ref,) = _unpack(
        refs, spec, extra_scratch=1
    )
    z, i, j, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row0, col0 = i * bm, j * bn
    lo, hi = _k_range(spec, i, j, bm, bn, bk, nk)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((kk >= lo) & (kk < hi))
    def _accumulate():
        k0 = kk * bk
        a = _a_tile([r[...] for r in a_refs], spec, row0, k0)
        b = _b_tile(b_ref[...], spec, k0, col0)
        acc_ref[...] += dot_f32(a, b, precision)

    @pl.when(kk == nk - 1)
    def _store():
        coef = (lambda idx: coef_ref[z, idx]) if spec.has_coef else None
        xs = [x[...] for x in x_refs]
        rs = rs_ref[...] if spec.row_scale else None
        cs = cs_ref[...] if spec.col_scale else None
        out = _epilogue(acc_ref[...], spec, coef, xs, rs, cs, row0, col0)
        o_ref[...] = out.astype(o_ref.dtype)


def _tpu_product(a, b, xs, coef, rs, cs, *, spec, blocks, bm, bn, bk, precision, out_dtype,
                 interpret, name):
    del blocks
    nb, m, n, kdim = _dims(a, b, spec)
    nk = kdim // bk

    def kclamp(i, j, kk):
        lo, hi = _k_range(spec, i, j, bm, bn, bk, nk)
        return jnp.minimum(jnp.maximum(kk, lo), jnp.maximum(hi - 1, 0))

    if spec.trans_a:
        a_spec = pl.BlockSpec((None, bk, bm), lambda z, i, j, kk: (z, kclamp(i, j, kk), i))
    else:
        a_spec = pl.BlockSpec((None, bm, bk), lambda z, i, j, kk: (z, i, kclamp(i, j, kk)))
    if spec.trans_b:
        b_spec = pl.BlockSpec((None, bn, bk), lambda z, i, j, kk: (z, j, kclamp(i, j, kk)))
    else:
        b_spec = pl.BlockSpec((None, bk, bn), lambda z, i, j, kk: (z, kclamp(i, j, kk), j))
    tile = pl.BlockSpec((None, bm, bn), lambda z, i, j, kk: (z, i, j))
    in_specs, args = _operands(
        spec, a, b, xs, coef, rs, cs, a_spec=a_spec, b_spec=b_spec, tile=tile,
        coef_spec=pl.BlockSpec(memory_space=pltpu.SMEM),
        rs_spec=pl.BlockSpec((None, bm, 1), lambda z, i, j, kk: (z, i, 0)),
        cs_spec=pl.BlockSpec((None, 1, bn), lambda z, i, j, kk: (z, 0, j)),
    )
    kernel = ft.partial(_tpu_kernel, spec=spec, bm=bm, bn=bn, bk=bk, nk=nk, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb, m, n), out_dtype),
        grid=(nb, m // bm, n // bn, nk),
        in_specs=in_specs,
        out_specs=tile,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=name,
    )(*args)


def _operands(spec, a, b, xs, coef, rs, cs, *, a_spec, b_spec, tile, coef_spec, rs_spec,
              cs_spec):
    """(in_specs, args) of a product, in the order `_unpack` reads them."""
    pairs = [(coef_spec, coef)] if spec.has_coef else []
    pairs += [(a_spec, part) for part in _a_parts(a, spec)]
    pairs.append((b_spec, b))
    pairs += [(tile, x) for x in xs]
    if spec.row_scale:
        pairs.append((rs_spec, rs))
    if spec.col_scale:
        pairs.append((cs_spec, cs))
    return [p for p, _ in pairs], [x for _, x in pairs]


def _a_parts(a, spec) -> list:
    """The A operand as a list of arrays: (A₁, A₂) for a difference, else (A,)."""
    return list(a) if spec.a_diff else [a]


def _dims(a, b, spec):
    """(batch, rows, columns, depth) of a product."""
    a0 = _a_parts(a, spec)[0]
    return a0.shape[0], _rows(a0, spec), _cols(b, spec), a0.shape[1 if spec.trans_a else 2]


def _rows(a, spec):
    return a.shape[2] if spec.trans_a else a.shape[1]


def _cols(b, spec):
    return b.shape[1] if spec.trans_b else b.shape[2]


def product(
    a,
    b,
    *,
    spec: ProductSpec,
    blocks: BlockSizes,
    backend: str,
    interpret: Any,
    precision,
    out_dtype,
    xs=(),
    coef=None,
    row_scale=None,
    col_scale=None,
    name: str = "psgd_product",
):
    """Launch one product (arrays batched and padded; see the module docstring).

    Blocks are fitted to the dims (a block larger than its dim shrinks to the dim, which
    the caller has padded to a legal size).
    """
    _, m, n, kdim = _dims(a, b, spec)
    bm = blocks.fitted(backend, "block_m", m)
    bn = blocks.fitted(backend, "block_n", n)
    bk = blocks.fitted(backend, "block_k", kdim)
    for dim, blk, what in ((m, bm, "rows"), (n, bn, "columns"), (kdim, bk, "depth")):
        if dim % blk:  # internal invariant: the wrappers pad
            raise AssertionError(f"{what}={dim} not padded to a multiple of its block {blk}")
    fn = _gpu_product if backend == "gpu" else _tpu_product
    return fn(
        a, b, tuple(xs), coef, row_scale, col_scale, spec=spec, blocks=blocks, bm=bm, bn=bn,
        bk=bk, precision=precision, out_dtype=out_dtype, interpret=interpret, name=name,
    )


# -- elementwise scaling (both Kronecker factors diagonal) ----------------------------------


def _scale_kernel(*refs, has_rs: bool, has_cs: bool):
    it = iter(refs)
    x_ref = next(it)
    rs_ref = next(it) if has_rs else None
    cs_ref = next(it) if has_cs else None
    o_ref = next(it)
    out = x_ref[...].astype(jnp.float32)
    if has_rs:
        out = out * rs_ref[...]
    if has_cs:
        out = out * cs_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def scale(x, row_scale, col_scale, *, backend: str, interpret: Any, num_warps: int = 8,
          name: str = "psgd_scale", tile: tuple[int, int] | None = None):
    """out = row_scale ⊙ x ⊙ col_scale with x (B, M, N), scales (B, M, 1) / (B, 1, N) in f32.

    Memory-bound: wide tiles of up to 8192 elements (rows of up to 1024 contiguous), whose
    sizes divide the (block-padded, hence power-of-two- or 128-aligned) dims.
    """
    nb, m, n = x.shape
    if tile is None:
        bn = math.gcd(n, 1024)
        bm = math.gcd(m, max(8, 8192 // bn))
    else:
        bm, bn = tile
    tile = pl.BlockSpec((None, bm, bn), lambda z, i, j: (z, i, j))
    in_specs, args = [tile], [x]
    if row_scale is not None:
        in_specs.append(pl.BlockSpec((None, bm, 1), lambda z, i, j: (z, i, 0)))
        args.append(row_scale)
    if col_scale is not None:
        in_specs.append(pl.BlockSpec((None, 1, bn), lambda z, i, j: (z, 0, j)))
        args.append(col_scale)
    if backend == "gpu":
        params = _triton_params(num_warps, 1)
    else:
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    kernel = ft.partial(_scale_kernel, has_rs=row_scale is not None, has_cs=col_scale is not None)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb, m, n), x.dtype),
        grid=(nb, m // bm, n // bn),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*args)
