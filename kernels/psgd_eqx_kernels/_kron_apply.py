"""`kron_apply`: P·G = (Q_lᴴQ_l) G (Q_rᴴQ_r)ᵀ for a (stack of) matrix gradient(s).

The matrix case of `KronQ.apply` (its einsum `"cb,ca,fe,fd,ad->be"`, real dtypes): per side
a dense factor Q (applied as QᵀQ, two products, or as a cached P = QᵀQ, one product), a
diagonal factor q (applied as |q|², fused into the last product's epilogue) or nothing.

Not dispatched by `psgd_eqx`'s optimizers yet (`KronQ.apply` always runs its jnp einsum:
on an H100 this kernel was slower than XLA, see `should_use_kernel`); callable directly.

Layout of this file: block-size helpers, the pure-jnp `kron_apply_reference`, the Pallas
path (a chain of `_matmul.product` launches, one per dense product), the jitted wrapper and
the `custom_jvp` whose tangent is the reference's.
"""

import dataclasses
import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Shaped

from . import _matmul
from ._blocks import (
    BlockSizes,
    check_backend,
    check_dtype,
    default_block_sizes,
    padded_dim,
)
from ._matmul import ProductSpec


_F32 = jnp.float32


def _side(q, g_ndim: int, name: str) -> str:
    if q is None:
        return "none"
    if q.ndim == g_ndim:
        return "dense"
    if q.ndim == g_ndim - 1:
        return "diag"
    raise ValueError(
        f"`{name}` must have {g_ndim} dims (dense factor) or {g_ndim - 1} (diagonal); "
        f"got shape {q.shape}."
    )


def _check(g, ql, qr, cached: bool, triangular: bool) -> tuple[str, str]:
    if g.ndim not in (2, 3):
        raise ValueError(f"`g` must be (m, n) or (batch, m, n); got shape {g.shape}.")
    left, right = _side(ql, g.ndim, "ql"), _side(qr, g.ndim, "qr")
    batch = g.shape[:-2]
    m, n = g.shape[-2:]
    for q, kind, dim, name in ((ql, left, m, "ql"), (qr, right, n, "qr")):
        if kind == "dense" and q.shape != (*batch, dim, dim):
            raise ValueError(f"`{name}` must have shape {(*batch, dim, dim)}; got {q.shape}.")
        if kind == "diag" and q.shape != (*batch, dim):
            raise ValueError(f"`{name}` must have shape {(*batch, dim)}; got {q.shape}.")
    if cached and triangular:
        raise ValueError("`triangular=True` needs `cached=False` (a cached P is not triangular).")
    return left, right


# -- reference ---------------------------------------------------------------------------


def _mm(a, b, precision):
    """The product rule of the kernels: f32 accumulation, mixed operands cast to f32."""
    if a.dtype != b.dtype:
        a, b = a.astype(_F32), b.astype(_F32)
    return jnp.matmul(a, b, precision=precision, preferred_element_type=_F32)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def kron_apply_reference(
    g: Float[Array, "*batch m n"],
    ql: Float[Array, "*batch m m"] | Float[Array, "*batch m"] | None,
    qr: Float[Array, "*batch n n"] | Float[Array, "*batch n"] | None,
    *,
    cached: bool = False,
    triangular: bool = False,
    precision: Any = None,
) -> Float[Array, "*batch m n"]:
    """Pure-jnp semantics of [`kron_apply`][psgd_eqx_kernels.kron_apply] (same arguments)."""
    left, right = _check(g, ql, qr, cached, triangular)
    x = g
    if left == "dense":
        if cached:
            x = _mm(ql, x, precision)
        else:
            q = jnp.triu(ql) if triangular else ql
            x = _mm(_t(q), _mm(q, x, precision), precision)
    if right == "dense":
        if cached:
            x = _mm(x, _t(qr), precision)
        else:
            q = jnp.triu(qr) if triangular else qr
            x = _mm(_mm(x, _t(q), precision), q, precision)
    x = x.astype(_F32)
    if left == "diag":
        x = x * jnp.square(ql.astype(_F32))[..., :, None]
    if right == "diag":
        x = x * jnp.square(qr.astype(_F32))[..., None, :]
    return x.astype(g.dtype)


# -- Pallas path ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    cached: bool
    triangular: bool
    block_sizes: BlockSizes | None
    backend: str
    interpret: Any
    precision: Any


# Tiles (second-minor, minor) each product loads/stores, for the TPU (8, 128) check.
_TILES_PLAIN = (("block_m", "block_k"), ("block_k", "block_n"), ("block_m", "block_n"))
_TILES_TA = (("block_k", "block_m"),)
_TILES_TB = (("block_n", "block_k"),)


def _pad_to(x, shape):
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


@ft.partial(jax.jit, static_argnames=("cfg",))
def _forward(g, ql, qr, cfg: _Config):
    left, right = _check(g, ql, qr, cfg.cached, cfg.triangular)
    unbatched = g.ndim == 2
    if unbatched:
        g = g[None]
        ql = None if ql is None else ql[None]
        qr = None if qr is None else qr[None]
    nb, m, n = g.shape
    blocks = cfg.block_sizes or default_block_sizes(cfg.backend, g.dtype, max(m, n), nb)
    tiles = _TILES_PLAIN
    if left == "dense" and not cfg.cached:
        tiles = tiles + _TILES_TA
    if right == "dense":
        tiles = tiles + _TILES_TB
    blocks.validate(cfg.backend, tiles)
    names = ("block_m", "block_n", "block_k")
    mp = padded_dim(blocks, cfg.backend, m, names)
    np_ = padded_dim(blocks, cfg.backend, n, names)
    x = _pad_to(g, (nb, mp, np_))

    rs = cs = None
    if left == "diag":
        rs = _pad_to(jnp.square(ql.astype(_F32)), (nb, mp))[:, :, None]
    if right == "diag":
        cs = _pad_to(jnp.square(qr.astype(_F32)), (nb, np_))[:, None, :]

    # The chain of dense products: (operand, spec) applied to x in order.
    steps = []
    tri = cfg.triangular
    if left == "dense":
        qlp = _pad_to(ql, (nb, mp, mp))
        if cfg.cached:
            steps.append(("left", qlp, ProductSpec()))
        else:
            steps.append(("left", qlp, ProductSpec(a_tri="upper" if tri else None)))
            steps.append(("left", qlp, ProductSpec(trans_a=True, a_tri="lower" if tri else None)))
    if right == "dense":
        qrp = _pad_to(qr, (nb, np_, np_))
        if cfg.cached:
            steps.append(("right", qrp, ProductSpec(trans_b=True)))
        else:
            steps.append(("right", qrp, ProductSpec(trans_b=True, b_tri="lower" if tri else None)))
            steps.append(("right", qrp, ProductSpec(b_tri="upper" if tri else None)))

    if not steps:
        if rs is None and cs is None:
            out = x
        else:
            out = _matmul.scale(x, rs, cs, backend=cfg.backend, interpret=cfg.interpret,
                                name="kron_apply_scale")
    else:
        for idx, (side, q, spec) in enumerate(steps):
            last = idx == len(steps) - 1
            if x.dtype != q.dtype:  # cast once here rather than per tile in the kernel
                q = q.astype(_F32)
            if last:
                spec = dataclasses.replace(spec, row_scale=rs is not None,
                                           col_scale=cs is not None)
            a, b = (q, x) if side == "left" else (x, q)
            x = _matmul.product(
                a, b, spec=spec, blocks=blocks, backend=cfg.backend, interpret=cfg.interpret,
                precision=cfg.precision, out_dtype=g.dtype if last else _F32,
                row_scale=rs if last else None, col_scale=cs if last else None,
                name=f"kron_apply_{side}",
            )
        out = x
    out = out[:, :m, :n]
    return out[0] if unbatched else out


@ft.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _kron_apply(g, ql, qr, cfg: _Config):
    return _forward(g, ql, qr, cfg)


@_kron_apply.defjvp
def _kron_apply_jvp(cfg, primals, tangents):
    out = _kron_apply(*primals, cfg)
    ref = ft.partial(kron_apply_reference, cached=cfg.cached, triangular=cfg.triangular,
                     precision=cfg.precision)
    _, t_out = jax.jvp(ref, primals, tangents)
    return out, t_out


def kron_apply(
    g: Float[Array, "*batch m n"],
    ql: Float[Array, "*batch m m"] | Float[Array, "*batch m"] | None,
    qr: Float[Array, "*batch n n"] | Float[Array, "*batch n"] | None,
    *,
    cached: bool = False,
    triangular: bool = False,
    block_sizes: BlockSizes | None = None,
    backend: str = "gpu",
    interpret: Any = False,
    precision: Any = None,
) -> Shaped[Array, "*batch m n"]:
    """Kronecker preconditioner applied to a matrix: P·G = P_l G P_rᵀ, with P = QᵀQ per side.

    The matrix case of `KronQ.apply` as one Pallas launch per dense product (four with two
    dense factors, two with `cached=True`); diagonal factors are fused into the last
    launch's epilogue, or run as one elementwise kernel when no side is dense.

    Not dispatched by `psgd_eqx`'s optimizers yet (on an H100 it was slower than XLA);
    callable directly.

    **Arguments:**

    - `g`: the gradient, `(m, n)` or a stack `(batch, m, n)`; float32 or bfloat16.
    - `ql`: the left factor: dense `(…, m, m)` (Q, applied as QᵀQ), diagonal `(…, m)`
        (q, applied as |q|²), or `None` (identity).
    - `qr`: the right factor, likewise with n.
    - `cached`: the dense factors are the cached P = QᵀQ themselves (applied once, two
        products instead of four).
    - `triangular`: the dense factors are upper triangular (the `EQ` geometry): their
        strictly lower part is ignored and the zero blocks are skipped (about half the
        flops of each product at large n).
    - `block_sizes`: tiles; `None` picks
        [`default_block_sizes`][psgd_eqx_kernels.default_block_sizes].
    - `backend`: `"gpu"` (Pallas Triton) or `"tpu"` (Mosaic TPU).
    - `interpret`: `False` (compiled), `True` (Pallas interpreter, any platform) or
        `pltpu.InterpretParams()` (TPU-semantics interpreter).
    - `precision`: `jax.lax.Precision` of the products; `None`/`DEFAULT` is TF32 for
        float32 on GPU (as XLA's default), `HIGHEST` full float32.

    **Returns:** P·G with the shape and dtype of `g`. Every product accumulates in float32
    and intermediates stay in float32; a product of a bfloat16 and a float32 operand runs
    in float32.

    Differentiable: the tangent is that of
    [`kron_apply_reference`][psgd_eqx_kernels.kron_apply_reference] (`custom_jvp`).
    """
    check_backend(backend)
    check_dtype("g", g.dtype)
    for q, name in ((ql, "ql"), (qr, "qr")):
        if q is not None:
            check_dtype(name, q.dtype)
    _check(g, ql, qr, cached, triangular)
    blocks = block_sizes
    if blocks is not None and not isinstance(blocks, BlockSizes):
        raise ValueError(f"`block_sizes` must be a BlockSizes or None; got {blocks!r}.")
    cfg = _Config(bool(cached), bool(triangular), blocks, backend, interpret, precision)
    return _kron_apply(g, ql, qr, cfg)
