"""`eq_factor_update`: the fused `EQ` step of a triangular factor, Q ← Q − η triu(T₁ − T₂) Q.

The rule of `psgd_eqx._geometry.dense_step("EQ", …, triangular=True)` with matrix
statistics, batched over a stack of factors: E = triu(T₁ − T₂) is one elementwise pass
(or, with `fuse_difference=True`, is formed tile by tile inside the product), then one
Pallas launch does the product and the axpy per output tile, never loading the
blocks that are zero because both triu(E) and Q are upper triangular (about a sixth of the
flops of the dense product at large n), and writes the upper triangle only.

The one op `psgd_eqx`'s optimizers dispatch: `psgd_eqx._ops.eq_triangular_step` calls it
for the dense factors of a `KronQ` with geometry `"EQ"` (on GPU for n ≥ 2048 under
`use_kernels="auto"`, on GPU/TPU for every n under `True`, in the interpreter under
`"interpret"`).

Layout: the pure-jnp `eq_factor_update_reference`, the jitted Pallas wrapper, the
`custom_jvp` with the reference's tangent, and the public function.
"""

import dataclasses
import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from . import _matmul
from ._blocks import BlockSizes, check_backend, check_dtype, default_block_sizes, padded_dim
from ._matmul import ProductSpec


_F32 = jnp.float32
_TILES = (("block_m", "block_k"), ("block_k", "block_n"), ("block_m", "block_n"))


def _check(q, t1, t2, eta) -> None:
    if q.ndim not in (2, 3) or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"`q` must be (n, n) or (batch, n, n); got shape {q.shape}.")
    for x, name in ((t1, "t1"), (t2, "t2")):
        if x.shape != q.shape:
            raise ValueError(f"`{name}` must have the shape of `q` {q.shape}; got {x.shape}.")
    if jnp.shape(eta) != q.shape[:-2]:
        raise ValueError(f"`eta` must have shape {q.shape[:-2]}; got {jnp.shape(eta)}.")


def eq_factor_update_reference(
    q: Float[Array, "*batch n n"],
    t1: Float[Array, "*batch n n"],
    t2: Float[Array, "*batch n n"],
    eta: Float[ArrayLike, "*batch"],
    *,
    precision: Any = None,
) -> Float[Array, "*batch n n"]:
    """Pure-jnp semantics of [`eq_factor_update`][psgd_eqx_kernels.eq_factor_update].

    triu(Q) − η · triu(T₁ − T₂) · triu(Q), computed in float32, returned in `q`'s dtype.
    """
    eta = jnp.asarray(eta)
    _check(q, t1, t2, eta)
    qf = jnp.triu(q.astype(_F32))
    e = jnp.triu(t1.astype(_F32) - t2.astype(_F32))
    step = jnp.matmul(e, qf, precision=precision, preferred_element_type=_F32)
    out = qf - eta.astype(_F32)[..., None, None] * step
    return out.astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class _Config:
    block_sizes: BlockSizes | None
    backend: str
    interpret: Any
    precision: Any
    fuse_difference: bool = False


@ft.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, t1, t2, eta, cfg: _Config):
    unbatched = q.ndim == 2
    if unbatched:
        q, t1, t2, eta = q[None], t1[None], t2[None], eta[None]
    nb, n, _ = q.shape
    blocks = cfg.block_sizes or default_block_sizes(cfg.backend, q.dtype, n, nb)
    blocks.validate(cfg.backend, _TILES)
    npad = padded_dim(blocks, cfg.backend, n, ("block_m", "block_n", "block_k"))
    pad = ((0, 0), (0, npad - n), (0, npad - n))
    qf = q.astype(_F32)
    if cfg.fuse_difference:
        # one launch: each tile of T₁ − T₂ is formed in the contraction loop (an elementwise
        # op between load and dot, which costs pipelining at large n; the saved launch and
        # HBM round trip of E pay at small n)
        a = tuple(jnp.pad(x, pad) if npad > n else x for x in (t1, t2))
    else:
        # E = triu(T₁ − T₂) as one elementwise pass (XLA fuses it with the padding)
        a = jnp.triu(t1.astype(_F32) - t2.astype(_F32))
        a = jnp.pad(a, pad) if npad > n else a
    qp = jnp.pad(qf, pad) if npad > n else qf
    zero = jnp.zeros((nb,), _F32)
    coef = jnp.stack([jnp.ones((nb,), _F32), zero, -eta.astype(_F32), zero], axis=-1)
    spec = ProductSpec(a_tri="upper", b_tri="upper", out_tri="upper", n_extra=1, has_coef=True,
                       a_diff=cfg.fuse_difference)
    out = _matmul.product(
        a, qp, xs=(qp,), coef=coef, spec=spec, blocks=blocks, backend=cfg.backend,
        interpret=cfg.interpret, precision=cfg.precision, out_dtype=q.dtype,
        name="eq_factor_update",
    )
    out = out[:, :n, :n]
    return out[0] if unbatched else out


@ft.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _eq_factor_update(q, t1, t2, eta, cfg: _Config):
    return _forward(q, t1, t2, eta, cfg)


@_eq_factor_update.defjvp
def _eq_factor_update_jvp(cfg, primals, tangents):
    out = _eq_factor_update(*primals, cfg)
    ref = ft.partial(eq_factor_update_reference, precision=cfg.precision)
    _, t_out = jax.jvp(ref, primals, tangents)
    return out, t_out


def eq_factor_update(
    q: Float[Array, "*batch n n"],
    t1: Float[Array, "*batch n n"],
    t2: Float[Array, "*batch n n"],
    eta: Float[ArrayLike, "*batch"],
    *,
    block_sizes: BlockSizes | None = None,
    backend: str = "gpu",
    interpret: Any = False,
    precision: Any = None,
    fuse_difference: bool = False,
) -> Float[Array, "*batch n n"]:
    """One fused `EQ` step of (a stack of) upper-triangular factors.

    Q ← Q − η · triu(T₁ − T₂) · Q, exactly the triangular `EQ` rule of
    `psgd_eqx._geometry.dense_step` (E = T₁ − T₂, η the normalised step μ/L).

    **Arguments:**

    - `q`: the factor(s), `(n, n)` or `(batch, n, n)`, upper triangular (the strictly
        lower part is ignored and returned as zero); float32 or bfloat16.
    - `t1`, `t2`: the statistics, same shape (any dtype of the two above).
    - `eta`: the step per factor, shape `()` or `(batch,)`.
    - `block_sizes`: tiles; `None` picks
        [`default_block_sizes`][psgd_eqx_kernels.default_block_sizes].
    - `backend`: `"gpu"` (Pallas Triton) or `"tpu"` (Mosaic TPU).
    - `interpret`: `False` (compiled), `True` (Pallas interpreter) or
        `pltpu.InterpretParams()` (TPU-semantics interpreter).
    - `precision`: `jax.lax.Precision` of the product (`None` = TF32 on GPU for float32,
        like XLA's default).
    - `fuse_difference`: form T₁ − T₂ tile by tile inside the product (one launch, no
        materialised E) instead of in a separate elementwise pass. Meant for small factors,
        where launches dominate; not yet timed on a GPU (it came after the H100
        measurements in `benchmarks/RESULTS.md`; `benchmarks/kernels.py --ops eq,eq_fused`
        compares the two), hence off by default.

    **Returns:** the updated factor(s), in `q`'s dtype (computed in float32).

    Differentiable: the tangent is that of
    [`eq_factor_update_reference`][psgd_eqx_kernels.eq_factor_update_reference].
    """
    check_backend(backend)
    for x, name in ((q, "q"), (t1, "t1"), (t2, "t2")):
        check_dtype(name, x.dtype)
    eta = jnp.asarray(eta, _F32)
    _check(q, t1, t2, eta)
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"`block_sizes` must be a BlockSizes or None; got {block_sizes!r}.")
    if block_sizes is not None:
        block_sizes.validate(backend, _TILES)
    if not isinstance(fuse_difference, bool):
        raise ValueError(f"`fuse_difference` must be a bool; got {fuse_difference!r}.")
    cfg = _Config(block_sizes, backend, interpret, precision, fuse_difference)
    return _eq_factor_update(q, t1, t2, eta, cfg)
