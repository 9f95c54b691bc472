"""`fused_kron_apply`: P·G = P_l G P_rᵀ for a stack of matrix gradients as ONE Pallas launch.

The matrix case of `KronQ.apply` (`psgd_eqx._precond.kron._kron_p_times`), per side one of

- `"dense"`: a factor Q, applied as P = QᵀQ;
- `"cached"`: P itself (the cache QᵀQ, or the factor of a stored-P geometry), one product;
- `"diag"`: a vector q, applied as the elementwise scale |q|² (with `diag_is_p=True`: q
    itself, the stored-P geometries `PRO4P`/`QUAD4P`);
- `None`: the identity.

Unlike [`kron_apply`][psgd_eqx_kernels.kron_apply] (one launch per dense product, the
intermediates going through HBM), each program of the single launch holds its tile of G and
its factors whole in on-chip memory (VMEM on TPU; registers/shared memory on GPU) and runs
every product of the chain, the diagonal scales fused into the epilogue.

**Grid.** `(batch, M/tm, N/tn)`. A side with a dense or cached factor needs the whole dim
of G it acts on, so its dim is not tiled (one tile); the dim of a diagonal or absent side
may be split into tiles (rows of G are independent under a right product, columns under a
left one). Tiles shrink, the larger first, only until the working set below fits (on TPU
a tiled dim may be padded by up to 1/8 more so that it splits into large tiles).

**Product order.** With square factors the order of the two sides does not change the
flops; what does is how a dense side is applied: twice Q (2·d²·t flops for a tile whose
other dim is t) or once P = QᵀQ formed in the kernel (d³ + d²·t). P is formed when d < t.
Transposes are dot-general dimension numbers (Qᵀx contracts dim 0 of both), never
materialised.

**Padding.** The wrapper zero-pads m and n and slices back. Zero padding is exact: a padded
Q is [[Q, 0], [0, 0]], so its QᵀQ is [[QᵀQ, 0], [0, 0]] and padded rows/columns of G stay out
of the sliced result. TPU: the lane (last) dim of every block a multiple of 128, the
sublane dim a multiple of 16 (the bf16 tiling, which covers f32's 8); so n → 128k, and m →
128k with a dense/cached left factor (m is then a block's last dim) else 16k. GPU (Triton):
every block dim a power of two ≥ 16 (`tl.dot`).

**Working set and `fused_apply_fits`.** A conservative estimate, in bytes, of one program:
the G tile and the output tile (G's dtype), each dense/cached factor d² and each diagonal
block as f32 (factor dtype unknown in advance), all double-buffered on TPU (the pipeline
prefetches the next program's blocks); plus two f32 tiles of intermediates (a product's
operand and result) and, per formed P, d² f32. Budgets: TPU 24 MiB (the kernel asks Mosaic
for a 32 MiB scoped VMEM limit; VMEM is 64–128 MiB on v5e/v5p/v6e/v7x); GPU 200 KiB (H100/
H200: 228 KiB shared memory and 256 KiB registers per SM). What fits, per this estimate
(the same for f32 and bf16 G, the factors counting as f32):

- GPU: dense/cached on both sides up to 64×64 (or 16…32 × ≤ 128); one dense/cached side
    ≤ 128 with a diagonal or no other side of any size (that dim is tiled); diagonal/None
    on both sides: any (m, n). Beyond that a single factor no longer fits the budget.
- TPU: dense/cached on both sides up to 768×768 (512×1024, 256×1280, 128×1536); one
    dense/cached side ≤ 1536 (a 9 MiB f32 factor, double-buffered) with a diagonal or no
    other side of any size; diagonal/None on both sides: any (m, n).

Only interpret mode was run (CPU: `interpret=True` for the GPU variant,
`pltpu.InterpretParams()` for the TPU variant) and lowering to Triton/Mosaic IR checked;
the kernel has not been compiled or timed on a GPU or TPU.

Layout: validation, the plan (padding, tiles, product order, working set), the pure-jnp
`fused_kron_apply_reference`, the kernel and its jitted wrapper, the `custom_jvp` with the
reference's tangent, and the public functions.
"""

import dataclasses
import functools as ft
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from ._blocks import _round_up, aligned_dim, check_backend, check_dtype
from ._kron_apply import _mm, _t  # the reference product rule shared with kron_apply


_F32 = jnp.float32
KINDS: tuple[str, ...] = ("dense", "cached", "diag")
_FULL = ("dense", "cached")  # kinds whose side needs the whole dim of G
_NONE = "none"  # internal name of an absent side

# Working-set budgets (bytes) of one program; see the module docstring.
_BUDGETS: dict[str, int] = {"tpu": 24 * 2**20, "gpu": 200 * 2**10}
_TPU_VMEM_LIMIT = 32 * 2**20
_TPU_LANE, _TPU_SUBLANE = 128, 16
_GPU_MIN = 16

# A side: None, or a (kind, array) pair.
Side = tuple[str, Float[Array, "..."]] | None


# -- validation ------------------------------------------------------------------------


def _side(side, name: str) -> tuple[str, Any]:
    """(kind, array) of a side, `("none", None)` for None; ValueError on a malformed side."""
    if side is None:
        return _NONE, None
    if not isinstance(side, tuple | list) or len(side) != 2:
        raise ValueError(
            f"`{name}` must be None or a (kind, array) pair with kind in {KINDS}; got {side!r}."
        )
    kind, arr = side
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"`{name}` kind must be one of {KINDS} (or the side None); got {kind!r}.")
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
        raise ValueError(f"`{name}` array must be an array; got {type(arr).__name__}.")
    return kind, arr


def _check(g, left, right):
    """((left kind, array), (right kind, array)) after checking every shape against `g`."""
    if g.ndim not in (2, 3):
        raise ValueError(f"`g` must be (m, n) or (batch, m, n); got shape {g.shape}.")
    batch = g.shape[:-2]
    m, n = g.shape[-2:]
    out = []
    for side, dim, name in ((left, m, "left"), (right, n, "right")):
        kind, arr = _side(side, name)
        if kind != _NONE:
            tail = (dim, dim) if kind in _FULL else (dim,)
            want = (*batch, *tail)
            if arr.ndim == len(want) and arr.shape[len(batch):] == tail:
                if arr.shape[: len(batch)] != batch:
                    raise ValueError(
                        f"`{name}` ({kind}) has batch {arr.shape[: len(batch)]}, but `g` has "
                        f"batch {batch} (batch mismatch)."
                    )
            if arr.shape != want:
                raise ValueError(
                    f"`{name}` ({kind}) must have shape {want} for `g` of shape {g.shape}; "
                    f"got {arr.shape}."
                )
        out.append((kind, arr))
    return tuple(out)


# -- plan: padding, tiles, product order, working set ----------------------------------


def _padded(dim: int, backend: str, lane: bool) -> int:
    return aligned_dim(backend, dim, lane, sublane=_TPU_SUBLANE)


@ft.lru_cache(maxsize=256)
def _tile_sizes(full: int, backend: str, lane: bool, tileable: bool) -> tuple:
    """(tile, padded dim) choices for an aligned dim `full`, largest tile first.

    GPU: the powers of two ≥ 16 up to `full` (itself one), no further padding. TPU: `full`
    split into k tiles, each rounded up to the alignment, for every k that divides it
    exactly and every power of two k, kept where the padding adds at most 1/8 (so a dim
    with few divisors still gets large tiles; few candidates even for huge dims).
    """
    if not tileable:
        return ((full, full),)
    if backend == "gpu":
        return tuple((t, full) for t in (full >> s for s in range(full.bit_length()))
                     if t >= _GPU_MIN)
    align = _TPU_LANE if lane else _TPU_SUBLANE
    units = full // align
    counts = {k for i in range(1, math.isqrt(units) + 1) if units % i == 0
              for k in (i, units // i)}
    counts |= {1 << s for s in range(units.bit_length())}
    out = {}
    for k in counts:
        t = _round_up(-(-full // k), align)
        padded = _round_up(full, t)
        if 8 * (padded - full) <= full:
            out[t] = padded
    return tuple(sorted(out.items(), reverse=True))


@dataclasses.dataclass(frozen=True)
class _Plan:
    mp: int  # padded m
    np_: int  # padded n
    tm: int  # rows of a tile of G
    tn: int  # columns of a tile of G
    form_left: bool  # form P_l = Q_lᵀQ_l in the kernel (else apply Q_l twice)
    form_right: bool
    working_set: int  # bytes, the estimate of the module docstring
    budget: int

    @property
    def fits(self) -> bool:
        return self.working_set <= self.budget


def _working_set(plan_dims, kinds, forms, backend: str, itemsize: int) -> int:
    mp, np_, tm, tn = plan_dims
    buffers = 2 if backend == "tpu" else 1  # TPU pipelining double-buffers every block
    blocks = 2 * tm * tn * itemsize  # the G tile in, the output tile out
    inter = 2 * tm * tn * 4  # a product's f32 operand and result
    for kind, d, t, form, row in ((kinds[0], mp, tm, forms[0], True),
                                  (kinds[1], np_, tn, forms[1], False)):
        if kind in _FULL:
            blocks += d * d * 4
            inter += d * d * 4 if form else 0
        elif kind == "diag":
            # A (t, 1) / (1, t) f32 block; on TPU it occupies whole (8, 128) tiles.
            blocks += 4 * t * (1 if backend == "gpu" else (_TPU_LANE if row else 8))
    return buffers * blocks + inter


def _plan(m: int, n: int, kl: str, kr: str, backend: str, itemsize: int, budget: int) -> _Plan:
    """Padded dims, the largest tiles whose working set fits (else the smallest), the order."""
    rows = _tile_sizes(_padded(m, backend, lane=kl in _FULL), backend, lane=kl in _FULL,
                       tileable=kl not in _FULL)
    cols = _tile_sizes(_padded(n, backend, lane=True), backend, lane=True,
                       tileable=kr not in _FULL)
    i = j = 0
    while True:
        (tm, mp), (tn, np_) = rows[i], cols[j]
        forms = (kl == "dense" and mp < tn, kr == "dense" and np_ < tm)
        ws = _working_set((mp, np_, tm, tn), (kl, kr), forms, backend, itemsize)
        can_i, can_j = i + 1 < len(rows), j + 1 < len(cols)
        if ws <= budget or not (can_i or can_j):
            return _Plan(mp, np_, tm, tn, *forms, ws, budget)
        # shrink the larger tile first (keeps tiles close to square, fewest programs)
        if can_i and (not can_j or tm >= tn):
            i += 1
        else:
            j += 1


def fused_apply_fits(
    m: int, n: int, left_kind: str | None, right_kind: str | None, backend: str, dtype: Any
) -> bool:
    """Whether [`fused_kron_apply`][psgd_eqx_kernels.fused_kron_apply] fits on chip.

    The conservative working-set estimate of the module docstring (the G and output tiles,
    the factors as f32, two f32 intermediates and any P formed in the kernel, double-buffered
    on TPU) of the largest tiles the kernel would use, against 24 MiB of VMEM (TPU) or
    200 KiB of registers/shared memory (GPU). A diagonal or absent side lets the kernel tile
    G's other dim, so only the dense/cached sides bound the size. Not measured on hardware.

    **Arguments:**

    - `m`, `n`: the gradient matrix's shape (unpadded).
    - `left_kind`, `right_kind`: `"dense"`, `"cached"`, `"diag"` or `None`.
    - `backend`: `"gpu"` or `"tpu"`.
    - `dtype`: the dtype of `g` (float32 or bfloat16).

    **Returns:** `True` if the estimate is within the backend's budget.
    """
    check_backend(backend)
    check_dtype("dtype", dtype)
    for dim, name in ((m, "m"), (n, "n")):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`{name}` must be a positive int; got {dim!r}.")
    kinds = []
    for kind, name in ((left_kind, "left_kind"), (right_kind, "right_kind")):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"`{name}` must be one of {KINDS} or None; got {kind!r}.")
        kinds.append(_NONE if kind is None else kind)
    itemsize = jnp.dtype(dtype).itemsize
    return _plan(m, n, *kinds, backend, itemsize, _BUDGETS[backend]).fits


# -- reference -------------------------------------------------------------------------


def _diag_scale(q, diag_is_p: bool):
    q = q.astype(_F32)
    return q if diag_is_p else q * q


def fused_kron_apply_reference(
    g: Float[Array, "*batch m n"],
    left: Side,
    right: Side,
    *,
    diag_is_p: bool = False,
    precision: Any = None,
) -> Float[Array, "*batch m n"]:
    """Pure-jnp semantics of [`fused_kron_apply`][psgd_eqx_kernels.fused_kron_apply].

    P_l G P_rᵀ with P = QᵀQ (`"dense"`), P (`"cached"`), diag(|q|²) or diag(q) (`"diag"`,
    per `diag_is_p`) or I (`None`) per side; products accumulate in float32, the result is
    in `g`'s dtype. Same arguments as the kernel.
    """
    (kl, ql), (kr, qr) = _check(g, left, right)
    x = g
    if kl == "dense":
        x = _mm(_t(ql), _mm(ql, x, precision), precision)
    elif kl == "cached":
        x = _mm(ql, x, precision)
    if kr == "dense":
        x = _mm(_mm(x, _t(qr), precision), qr, precision)
    elif kr == "cached":
        x = _mm(x, _t(qr), precision)
    x = x.astype(_F32)
    if kl == "diag":
        x = x * _diag_scale(ql, diag_is_p)[..., :, None]
    if kr == "diag":
        x = x * _diag_scale(qr, diag_is_p)[..., None, :]
    return x.astype(g.dtype)


# -- Pallas path -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    left: str
    right: str
    diag_is_p: bool
    backend: str
    interpret: Any
    precision: Any
    budget: int


def _dot(a, b, precision, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in f32; the transposes are dimension numbers, not copies."""
    if a.dtype != b.dtype:
        a, b = a.astype(_F32), b.astype(_F32)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _kernel(*refs, cfg: _Config, plan: _Plan):
    it = iter(refs)
    g_ref = next(it)
    l_ref = None if cfg.left == _NONE else next(it)
    r_ref = None if cfg.right == _NONE else next(it)
    o_ref = next(it)
    prec = cfg.precision

    x = g_ref[...]
    if cfg.left == "dense":
        q = l_ref[...]
        if plan.form_left:  # m < tile width: P_l = Q_lᵀQ_l once is cheaper than Q_l twice
            x = _dot(_dot(q, q, prec, trans_a=True), x, prec)
        else:
            x = _dot(q, _dot(q, x, prec), prec, trans_a=True)
    elif cfg.left == "cached":
        x = _dot(l_ref[...], x, prec)
    if cfg.right == "dense":
        q = r_ref[...]
        if plan.form_right:
            x = _dot(x, _dot(q, q, prec, trans_a=True), prec, trans_b=True)
        else:
            x = _dot(_dot(x, q, prec, trans_b=True), q, prec)
    elif cfg.right == "cached":
        x = _dot(x, r_ref[...], prec, trans_b=True)
    # epilogue: the diagonal scales, in f32
    x = x.astype(_F32)
    if cfg.left == "diag":
        x = x * _diag_scale(l_ref[...], cfg.diag_is_p)  # (tm, 1)
    if cfg.right == "diag":
        x = x * _diag_scale(r_ref[...], cfg.diag_is_p)  # (1, tn)
    o_ref[...] = x.astype(o_ref.dtype)


def _pad_to(x, shape):
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _side_operand(kind, q, nb, d, tile, row: bool):
    """(array, BlockSpec) of one side's factor, padded (and a diagonal made 2-D)."""
    if kind in _FULL:
        return _pad_to(q, (nb, d, d)), pl.BlockSpec((None, d, d), lambda z, i, j: (z, 0, 0))
    q = _pad_to(q, (nb, d))
    if row:  # (d, 1): a column of row scales, tiled like G's rows
        return q[:, :, None], pl.BlockSpec((None, tile, 1), lambda z, i, j: (z, i, 0))
    return q[:, None, :], pl.BlockSpec((None, 1, tile), lambda z, i, j: (z, 0, j))


def _compiler_params(backend: str, plan: _Plan):
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        # One program per tile and no loop: nothing to pipeline (one stage).
        warps = 4 if plan.tm * plan.tn <= 64 * 64 else 8
        return pltriton.CompilerParams(num_warps=warps, num_stages=1)
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel"),
        vmem_limit_bytes=_TPU_VMEM_LIMIT,
    )


@ft.partial(jax.jit, static_argnames=("cfg",))
def _forward(g, ql, qr, cfg: _Config):
    unbatched = g.ndim == 2
    if unbatched:
        g = g[None]
        ql = None if ql is None else ql[None]
        qr = None if qr is None else qr[None]
    nb, m, n = g.shape
    plan = _plan(m, n, cfg.left, cfg.right, cfg.backend, g.dtype.itemsize, cfg.budget)
    args = [_pad_to(g, (nb, plan.mp, plan.np_))]
    tile = pl.BlockSpec((None, plan.tm, plan.tn), lambda z, i, j: (z, i, j))
    in_specs = [tile]
    for kind, q, d, t, row in ((cfg.left, ql, plan.mp, plan.tm, True),
                               (cfg.right, qr, plan.np_, plan.tn, False)):
        if kind != _NONE:
            arr, spec = _side_operand(kind, q, nb, d, t, row)
            args.append(arr)
            in_specs.append(spec)
    out = pl.pallas_call(
        ft.partial(_kernel, cfg=cfg, plan=plan),
        out_shape=jax.ShapeDtypeStruct((nb, plan.mp, plan.np_), g.dtype),
        grid=(nb, plan.mp // plan.tm, plan.np_ // plan.tn),
        in_specs=in_specs,
        out_specs=tile,
        compiler_params=_compiler_params(cfg.backend, plan),
        interpret=cfg.interpret,
        name="fused_kron_apply",
    )(*args)
    out = out[:, :m, :n]
    return out[0] if unbatched else out


def _as_side(kind: str, q):
    return None if kind == _NONE else (kind, q)


@ft.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fused(g, ql, qr, cfg: _Config):
    return _forward(g, ql, qr, cfg)


@_fused.defjvp
def _fused_jvp(cfg, primals, tangents):
    out = _fused(*primals, cfg)

    def ref(g, ql, qr):
        return fused_kron_apply_reference(
            g, _as_side(cfg.left, ql), _as_side(cfg.right, qr), diag_is_p=cfg.diag_is_p,
            precision=cfg.precision,
        )

    _, t_out = jax.jvp(ref, primals, tangents)
    return out, t_out


def fused_kron_apply(
    g: Float[Array, "*batch m n"],
    left: Side,
    right: Side,
    *,
    diag_is_p: bool = False,
    backend: str = "gpu",
    interpret: Any = False,
    precision: Any = None,
) -> Float[Array, "*batch m n"]:
    """Kronecker preconditioner applied to a (stack of) matrix gradient(s) in one launch.

    P·G = P_l G P_rᵀ (the matrix case of `KronQ.apply`), with per side a dense factor Q
    (P = QᵀQ), a cached/stored P, a diagonal, or nothing: one `pallas_call` whose programs
    each hold a tile of G and the factors in on-chip memory and run all the products, the
    diagonal scales fused into the epilogue (see the module docstring for the grid, the
    product order and the padding). Check
    [`fused_apply_fits`][psgd_eqx_kernels.fused_apply_fits] before a compiled call: larger
    factors do not fit on chip (the call does not check it).

    **Arguments:**

    - `g`: the gradient, `(m, n)` or a stack `(batch, m, n)`; float32 or bfloat16.
    - `left`: the factor acting on m: `None` (identity) or a `(kind, array)` pair, with
        kind `"dense"` (Q `(…, m, m)`, applied as QᵀQ), `"cached"` (P `(…, m, m)`,
        applied as is: the cache QᵀQ or a stored-P factor) or `"diag"` (q `(…, m)`,
        applied as |q|², or as q with `diag_is_p`). float32 or bfloat16, independently of
        `g`.
    - `right`: the factor acting on n, likewise (applied as P_rᵀ on the right).
    - `diag_is_p`: diagonal factors hold P's diagonal itself (the stored-P geometries
        `PRO4P`/`QUAD4P`), not q.
    - `backend`: `"gpu"` (Pallas Triton) or `"tpu"` (Mosaic TPU).
    - `interpret`: `False` (compiled), `True` (Pallas interpreter, any platform) or
        `pltpu.InterpretParams()` (TPU-semantics interpreter).
    - `precision`: `jax.lax.Precision` of the products; `None`/`DEFAULT` is TF32 for
        float32 on GPU (as XLA's default), `HIGHEST` full float32.

    **Returns:** P·G with the shape and dtype of `g`. Products accumulate in float32 and
    intermediates stay float32; a product of a bfloat16 and a float32 operand runs in
    float32. `g` itself (no launch) when both sides are `None`.

    Differentiable: the tangent is that of
    [`fused_kron_apply_reference`][psgd_eqx_kernels.fused_kron_apply_reference]
    (`custom_jvp`). Batches under `jax.vmap`.
    """
    check_backend(backend)
    check_dtype("g", g.dtype)
    (kl, ql), (kr, qr) = _check(g, left, right)
    for q, name in ((ql, "left"), (qr, "right")):
        if q is not None:
            check_dtype(name, q.dtype)
    if not isinstance(diag_is_p, bool):
        raise ValueError(f"`diag_is_p` must be a bool; got {diag_is_p!r}.")
    if kl == _NONE and kr == _NONE:
        return g
    cfg = _Config(kl, kr, diag_is_p, backend, interpret, precision, _BUDGETS[backend])
    return _fused(g, ql, qr, cfg)

