"""`fused_factor_refit`: the whole refit of a stack of dense factors in one Pallas launch.

For each factor b of a stack, exactly what `psgd_eqx._geometry.fit_factor(geometry, q, t1,
t2, old_l, lr, key, normaliser, dense=True)` computes, with the random starts of the norm
bounds passed in (so the kernel is deterministic):

1. ℓ = a lower bound of ‖T₁ + T₂‖₂: `bound(T₁) + c` for a scalar T₂ = c·I, `bound(T₁ + T₂)`
    for a matrix T₂. `bound` is `psgd_eqx.Normaliser.norm_lower_bound`: the matrix is
    divided by its max-abs first; `"subspace"` starts from the rows `aⱼ + sign(v·aⱼ) v` of
    `start_ell` aligned with the largest row aⱼ, runs `half_iters` × (V a, row-normalise,
    V a) and returns the largest row norm; `"one_step"` is psgd_jax's deterministic
    ‖aⱼ a a‖ / ‖aⱼ a‖.
2. L = max(β L_old + (1 − β) ℓ, ℓ) (L = ℓ when β = 0) and η = μ / max(L, tiny).
3. The geometry's move with E = T₁ − T₂:
    - `"PRO"`: Q₁ = Q − η E Q, then one Procrustes step (R = Q₁ᵀ − Q₁ divided by its own
      norm bound, started from `start_r`; a ≤ `max_step` from tr(RQ₁), tr(R²Q₁);
      Q₁ + a(RQ₁ + a/2 R²Q₁));
    - `"EQ"`: Q − η triu(E) Q;
    - `"QUAD"`: p = Q − η/2 E Q; p − η/2 p E; (p + pᵀ)/2.

T₁ may be given as a matrix (`t1`) or formed in the kernel from the probe (`y`, T₁ = y yᵀ:
`Contract(P·h, P·h)` of a Kronecker factor, with the factor's axis first and the other axes
flattened into m).

**One launch for the stack.** The grid is `(batch,)`; each program holds its factor and all
its operands whole in on-chip memory (blocks `(None, n_pad, n_pad)`, …) and runs the whole
refit there, so a refit costs one launch and one HBM round trip per factor instead of a
dozen XLA ops. The body uses only 2-D `dot`/`dot_general` products (f32 accumulation,
`precision`), elementwise ops, `max`/`sum`/`min` reductions with `keepdims` and
`broadcasted_iota` masks: the largest row is selected by a one-hot mask (the first index
attaining the max, as `argmax`) and a masked sum, traces and the triangle are iota masks,
`half_iters` is unrolled. Per-factor scalars (c, L_old, μ) travel in a small f32 tile per
factor (lanes 0, 1, 2, every row equal) and L comes back the same way.

**Padding.** The wrapper zero-pads n (and m, k) to the backend's alignment (TPU: multiples of
128 on lane dims and of 8 on sublane dims, n being both; GPU (Triton): powers of two ≥ 16)
and slices back. Zero padding is exact for every step (padded rows and columns of Q, T, y, E,
Q₁, R stay zero, add nothing to sums, traces or row norms, and lose every max), except the
padded rows of a start matrix: aⱼ + sign(0)·0 would make them copies of aⱼ. They are masked
to zero at the start (so they stay zero through the iterations and lose the final max).

**What fits** ([`fused_refit_fits`][psgd_eqx_kernels.fused_refit_fits]): a
conservative count of one program's working set: its operands as stored (Q in and out in
Q's dtype, the statistic and a matrix T₂ counted as f32, the two `(k_pad, n_pad)` starts)
plus six live `n_pad × n_pad` f32 values of the body (its peak is the Procrustes step: Q₁,
R, RQ₁, R²Q₁ and the result, plus one spare) and two `(k_pad, n_pad)` iterates of the
bound.

- TPU (Mosaic): the Pallas pipeline double-buffers every operand in VMEM (the next factor's
    blocks are fetched while this one runs), so operands count twice; the budget is 24 MiB,
    and the kernel requests `vmem_limit_bytes` = 32 MiB (above the 16–32 MiB scoped
    default, within the 64–128 MiB of VMEM of v5e, v5p, v6e and v7x; v4 and older have 16
    MiB and would need a smaller budget). With k = 32 and float32 Q: n ≤ 640 fit for the
    `t1` form and for `y` with m = n, n ≤ 512 for m = 4n. n = 1024 does not: it needs
    ≈ 57 MiB, which only v5e/v6e (128 MiB) hold with room to spare.
- GPU (Triton): a program's values are register tensors of one CTA (dot operands staged
    through shared memory), without double buffering; the budget is 200 KiB, about the
    shared memory (228 KiB) or the register file (256 KiB) of one H100/H200 SM. With
    k = 32: n ≤ 64 fit for `t1` and for m = n, n ≤ 32 for m = 4n. Larger n spill and
    are better served by the tiled kernels or XLA.

Only the interpreted modes (`interpret=True` with `backend="gpu"`,
`interpret=pltpu.InterpretParams()` with `backend="tpu"`) have been run. The kernel lowers
to Triton and Mosaic IR on a CPU machine (`tests/test_fused_dispatch.py` lowers a whole
`kron` step for `"cuda"` and `"tpu"`), but the hardware compilers have not run it yet.

Differentiable (a `custom_jvp` whose tangent is the reference's) and `vmap`-able (a
`custom_vmap` rule folds a vmapped axis into the stack: still one launch).

Layout: alignment and working-set estimate, the pure-jnp reference, the kernel body (bound,
geometry step, refit), the jitted wrapper, the batching rule and the `custom_jvp`,
argument checks and the public function.
"""

import dataclasses
import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, ArrayLike, Float

from ._blocks import aligned_dim, check_backend, check_dtype


_F32 = jnp.float32
# finfo(f32).smallest_normal (= .tiny): the guard of every division in psgd_eqx's refit
_TINY = float(jnp.finfo(jnp.float32).smallest_normal)
GEOMETRIES: tuple[str, ...] = ("PRO", "EQ", "QUAD")
BOUNDS: tuple[str, ...] = ("subspace", "one_step")

# Mosaic TPU: (sublane, lane) tiling of the last two dims of a block.
_TPU_SUBLANE, _TPU_LANE = 8, 128
# Triton: power-of-two block dims, at least 16 for `tl.dot`.
_GPU_MIN = 16
_TPU_VMEM_BUDGET = 24 * 1024 * 1024
_TPU_VMEM_LIMIT = 32 * 1024 * 1024
_GPU_ONCHIP_BUDGET = 200 * 1024
# live n_pad × n_pad f32 values of the body at its peak (see the module docstring)
_LIVE_MATRICES = 6


# -- alignment and working set ---------------------------------------------------------------


def _aligned(backend: str, dim: int, lane: bool) -> int:
    """`dim` padded for a lane (last) or sublane (second-to-last) dim of a block."""
    return aligned_dim(backend, dim, lane)


def _scalar_tile(backend: str) -> tuple[int, int]:
    """The per-factor scalar tile: the smallest legal f32 block of the backend."""
    return (_TPU_SUBLANE, _TPU_LANE) if backend == "tpu" else (_GPU_MIN, _GPU_MIN)


def _working_set_bytes(n: int, m: int | None, k: int, backend: str, itemsize: int) -> int:
    n_pad = _aligned(backend, n, lane=True)
    m_pad = n_pad if m is None else _aligned(backend, m, lane=True)
    k_pad = _aligned(backend, k, lane=False)
    mat = 4 * n_pad * n_pad
    start = 4 * k_pad * n_pad
    # Q in and out as stored, the statistic (T₁ or y) and T₂ as f32, the two starts
    operands = 2 * itemsize * n_pad * n_pad + 4 * n_pad * m_pad + mat + 2 * start
    live = _LIVE_MATRICES * mat + 2 * start
    # TPU double-buffers every operand across grid steps; Triton loads them once
    buffers = 2 if backend == "tpu" else 1
    return buffers * operands + live


def fused_refit_fits(n: int, m: int | None, k: int, backend: str, dtype: Any) -> bool:
    """Whether one program of [`fused_factor_refit`][psgd_eqx_kernels.fused_factor_refit]
    is expected to fit in on-chip memory.

    A conservative estimate (see the module docstring): the operands of one factor plus
    six live n×n f32 values, against 24 MiB of VMEM on TPU (operands double-buffered) or
    200 KiB per SM on GPU. With k = 32 and float32 Q, n ≤ 640 fit on TPU (n ≤ 512 when
    m = 4n) and n ≤ 64 on GPU (n ≤ 32 when m = 4n).

    **Arguments:**

    - `n`: the factor size.
    - `m`: the probe's other dim for the `y` form (T₁ = y yᵀ), `None` for the `t1` form.
    - `k`: the rows of the start matrices (`min(normaliser.k, n)`; 1 for `"one_step"`).
    - `backend`: `"gpu"` or `"tpu"`.
    - `dtype`: the storage dtype of Q (float32 or bfloat16).

    **Returns:** `True` if the working set is within the backend's budget.
    """
    check_backend(backend)
    for value, name in ((n, "n"), (k, "k")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        raise ValueError(f"`m` must be a positive int or None; got {m!r}.")
    check_dtype("dtype", dtype)
    need = _working_set_bytes(n, m, k, backend, jnp.dtype(dtype).itemsize)
    return need <= (_TPU_VMEM_BUDGET if backend == "tpu" else _GPU_ONCHIP_BUDGET)


# -- the pure-jnp reference ------------------------------------------------------------------


def _row_norms(x):
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def _reference_bound(a, start, bound: str, half_iters: int, mm):
    """`Normaliser.norm_lower_bound` of one matrix with the subspace start given."""
    scale = jnp.max(jnp.abs(a))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    a = a / safe
    aj = a[jnp.argmax(_row_norms(a))]
    if bound == "subspace":
        start = start.astype(_F32)
        dots = jnp.sum(aj[None, :] * start, axis=1, keepdims=True)
        v = aj[None, :] + jnp.sign(dots) * start
        for _ in range(half_iters):
            v = mm(v, a)
            v = v / (_row_norms(v)[:, None] + _TINY)
            v = mm(v, a)
        lb = jnp.max(_row_norms(v))
    else:
        y = mm(aj[None, :], a)
        lb = _row_norms(mm(y, a))[0] / (_row_norms(y)[0] + _TINY)
    return jnp.where(scale > 0, scale * lb, jnp.zeros_like(scale))


def _reference_one(q, t2, old_l, lr, t1, y, start_ell, start_r, *, geometry, beta, bound,
                   half_iters, max_step, precision):
    """One factor, written as `psgd_eqx._geometry.fit_factor` writes it."""
    mm = ft.partial(jnp.matmul, precision=precision, preferred_element_type=_F32)
    qf = q.astype(_F32)
    t1 = mm(y.astype(_F32), y.astype(_F32).T) if t1 is None else t1.astype(_F32)
    scalar = t2.ndim == 0
    t2 = t2.astype(_F32)
    n = q.shape[-1]
    if scalar:
        ell = _reference_bound(t1, start_ell, bound, half_iters, mm) + t2
    else:
        ell = _reference_bound(t1 + t2, start_ell, bound, half_iters, mm)
    old_l = old_l.astype(_F32)
    big_l = ell if beta == 0.0 else jnp.maximum(beta * old_l + (1.0 - beta) * ell, ell)
    eta = lr.astype(_F32) / jnp.maximum(big_l, _TINY)

    def e_left(x):
        return mm(t1, x) - (t2 * x if scalar else mm(t2, x))

    def e_right(x):
        return mm(x, t1) - (x * t2 if scalar else mm(x, t2))

    if geometry == "EQ":
        t2m = t2 * jnp.eye(n, dtype=_F32) if scalar else t2
        out = qf - eta * mm(jnp.triu(t1 - t2m), qf)
    elif geometry == "QUAD":
        p = qf - 0.5 * eta * e_left(qf)
        p = p - 0.5 * eta * e_right(p)
        out = 0.5 * (p + p.T)
    else:
        q1 = qf - eta * e_left(qf)
        r = q1.T - q1
        r = r / (_reference_bound(r, start_r, bound, half_iters, mm) + _TINY)
        rq = mm(r, q1)
        rrq = mm(r, rq)
        tr_rq, tr_rrq = jnp.trace(rq), jnp.trace(rrq)
        safe = jnp.where(tr_rrq < 0, tr_rrq, -jnp.ones_like(tr_rrq))
        a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, max_step), max_step)
        out = q1 + a * (rq + 0.5 * a * rrq)
    return out.astype(q.dtype), big_l


def fused_factor_refit_reference(
    q: Float[Array, "..."],
    t2: Float[Array, "..."],
    old_l: Float[Array, "..."],
    lr: ArrayLike,
    *,
    t1: Float[Array, "..."] | None = None,
    y: Float[Array, "..."] | None = None,
    start_ell: Float[Array, "..."] | None = None,
    start_r: Float[Array, "..."] | None = None,
    geometry: str = "PRO",
    beta: float = 0.9,
    bound: str = "subspace",
    half_iters: int = 2,
    max_step: float = 1.0 / 8.0,
    precision: Any = None,
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Pure-jnp semantics of
    [`fused_factor_refit`][psgd_eqx_kernels.fused_factor_refit]: the refit of
    `psgd_eqx._geometry.fit_factor` per factor (argmax, `jnp.trace`, `jnp.triu`), vmapped
    over the stack.

    **Arguments:** as `fused_factor_refit`, without `backend` and `interpret`.

    **Returns:** `(new q in q's dtype, new L in float32)`.
    """
    cfg = _Config(geometry, float(beta), bound, int(half_iters), float(max_step), "gpu",
                  False, precision)
    args = _check(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg)
    return _unbatch(jnp.ndim(q), *_reference_batched(*args, cfg))


@ft.partial(jax.jit, static_argnames=("cfg",))
def _reference_batched(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg):
    """The reference on checked, batched `(batch, …)` arguments (`lr` of shape `(batch,)`)."""
    one = ft.partial(_reference_one, geometry=cfg.geometry, beta=cfg.beta, bound=cfg.bound,
                     half_iters=cfg.half_iters, max_step=cfg.max_step,
                     precision=cfg.precision)
    return jax.vmap(one)(q, t2, old_l, lr, t1, y, start_ell, start_r)


# -- the kernel body -------------------------------------------------------------------------


def _dot(a, b, precision):
    return jnp.dot(a, b, precision=precision, preferred_element_type=_F32)


def _dot_nt(a, b, precision):
    """a bᵀ, contracting the last dims (no transpose materialised)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=_F32)


def _max2(x):
    """Max of a 2-D value as a (1, 1) value (lane then sublane reduction)."""
    return jnp.max(jnp.max(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _sum2(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _trace(x):
    return _sum2(jnp.where(_iota(x.shape, 0) == _iota(x.shape, 1), x, 0.0))


def _lane_scalar(tile, i: int):
    """Lane `i` of a scalar tile (every row equal) as a (1, 1) value, by a masked sum."""
    col = jnp.sum(jnp.where(_iota(tile.shape, 1) == i, tile, 0.0), axis=1, keepdims=True)
    return jnp.max(col, axis=0, keepdims=True)


def _row_norms_col(x):
    return jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))


def _kernel_bound(a, start, *, k: int, k_pad: int, bound: str, half_iters: int, precision):
    """`Normaliser.norm_lower_bound` of a padded matrix: (1, 1).

    `start` is the `(k_pad, n_pad)` start (zero-padded), or `None` for `"one_step"`, which
    runs on `k_pad` identical rows aⱼ so that every product is a legal 2-D tile.
    """
    n_pad = a.shape[0]
    scale = _max2(jnp.abs(a))
    safe = jnp.where(scale > 0, scale, 1.0)
    a = a / safe
    # the largest row aⱼ: the first row attaining the max row norm (argmax's tie rule),
    # picked by a one-hot mask and a sum over rows (exact, unlike a one-hot product). Row
    # indices are f32 (exact below 2²⁴): float min-reductions lower everywhere.
    norms = _row_norms_col(a)
    rows = _iota(norms.shape, 0).astype(_F32)
    j = jnp.min(jnp.where(norms == jnp.max(norms, axis=0, keepdims=True), rows, float(n_pad)),
                axis=0, keepdims=True)
    one_hot = _iota(a.shape, 0).astype(_F32) == j
    aj = jnp.sum(jnp.where(one_hot, a, 0.0), axis=0, keepdims=True)
    if bound == "subspace":
        dots = jnp.sum(aj * start, axis=1, keepdims=True)
        sign = jnp.where(dots > 0, 1.0, jnp.where(dots < 0, -1.0, 0.0))
        # padded start rows would become copies of aⱼ: zero them (they then stay zero)
        real = _iota(start.shape, 0) < k
        v = jnp.where(real, aj + sign * start, 0.0)
        for _ in range(half_iters):
            v = _dot(v, a, precision)
            v = v / (_row_norms_col(v) + _TINY)
            v = _dot(v, a, precision)
        lb = jnp.max(_row_norms_col(v), axis=0, keepdims=True)
    else:
        yv = _dot(jnp.broadcast_to(aj, (k_pad, n_pad)), a, precision)
        ratio = _row_norms_col(_dot(yv, a, precision)) / (_row_norms_col(yv) + _TINY)
        lb = jnp.max(ratio, axis=0, keepdims=True)
    return jnp.where(scale > 0, scale * lb, 0.0)


def _geometry_step(q, t1, t2, c, eta, start_r, cfg, bound_kw):
    """The geometry's move of the padded f32 factor; T₂ is the matrix `t2` or, if `t2` is
    None, c·I (applied as a scale, as psgd_eqx's `_lmul`)."""
    prec = cfg.precision

    def e_left(x):
        return _dot(t1, x, prec) - (c * x if t2 is None else _dot(t2, x, prec))

    def e_right(x):
        return _dot(x, t1, prec) - (c * x if t2 is None else _dot(x, t2, prec))

    if cfg.geometry == "EQ":
        # triu(T₁ − c·I) Q = triu(T₁) Q − c Q
        e = t1 if t2 is None else t1 - t2
        upper = _iota(e.shape, 1) >= _iota(e.shape, 0)
        step = _dot(jnp.where(upper, e, 0.0), q, prec)
        step = step - c * q if t2 is None else step
        return q - eta * step
    if cfg.geometry == "QUAD":
        p = q - 0.5 * eta * e_left(q)
        p = p - 0.5 * eta * e_right(p)
        return 0.5 * (p + p.T)
    q1 = q - eta * e_left(q)
    r = q1.T - q1
    r = r / (_kernel_bound(r, start_r, **bound_kw) + _TINY)
    rq = _dot(r, q1, prec)
    rrq = _dot(r, rq, prec)
    tr_rq, tr_rrq = _trace(rq), _trace(rrq)
    safe = jnp.where(tr_rrq < 0, tr_rrq, -1.0)
    a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, cfg.max_step), cfg.max_step)
    return q1 + a * (rq + 0.5 * a * rrq)


def _refit_kernel(*refs, cfg, layout):
    """One factor's refit; refs in the order of `_forward`'s `in_specs`, then the outputs."""
    it = iter(refs)
    scal_ref, q_ref, stat_ref = next(it), next(it), next(it)
    t2_ref = next(it) if layout.t2_matrix else None
    sell_ref = next(it) if layout.has_start_ell else None
    sr_ref = next(it) if layout.has_start_r else None
    q_out, l_out = next(it), next(it)

    scal = scal_ref[...]
    c, old_l, lr = (_lane_scalar(scal, i) for i in range(3))
    q = q_ref[...].astype(_F32)
    stat = stat_ref[...].astype(_F32)
    t1 = _dot_nt(stat, stat, cfg.precision) if layout.from_y else stat
    t2 = t2_ref[...].astype(_F32) if layout.t2_matrix else None
    bound_kw = dict(bound=cfg.bound, half_iters=cfg.half_iters, precision=cfg.precision)
    ell_kw = dict(bound_kw, k=layout.k_ell, k_pad=layout.k_ell_pad)
    start_ell = sell_ref[...] if layout.has_start_ell else None
    if t2 is None:
        ell = _kernel_bound(t1, start_ell, **ell_kw) + c
    else:
        ell = _kernel_bound(t1 + t2, start_ell, **ell_kw)
    if cfg.beta == 0.0:
        big_l = ell
    else:
        big_l = jnp.maximum(cfg.beta * old_l + (1.0 - cfg.beta) * ell, ell)
    eta = lr / jnp.maximum(big_l, _TINY)
    start_r = sr_ref[...] if layout.has_start_r else None
    r_kw = dict(bound_kw, k=layout.k_r, k_pad=layout.k_r_pad)
    out = _geometry_step(q, t1, t2, c, eta, start_r, cfg, r_kw)
    q_out[...] = out.astype(q_out.dtype)
    l_out[...] = jnp.broadcast_to(big_l, l_out.shape)


# -- the launch --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    geometry: str
    beta: float
    bound: str
    half_iters: int
    max_step: float
    backend: str
    interpret: Any
    precision: Any


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static facts of one launch that the kernel body needs."""

    from_y: bool
    t2_matrix: bool
    has_start_ell: bool
    has_start_r: bool
    k_ell: int
    k_ell_pad: int
    k_r: int
    k_r_pad: int


def _pad_to(x, shape):
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _compiler_params(backend: str, n_pad: int):
    if backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",),
                                    vmem_limit_bytes=_TPU_VMEM_LIMIT)
    from jax.experimental.pallas import triton as pltriton

    # whole-matrix programs: more warps spread the register tensors; nothing to pipeline
    return pltriton.CompilerParams(num_warps=4 if n_pad <= 32 else 8, num_stages=1)


@ft.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg: _Config):
    """The launch on checked, batched arguments (`lr` of shape `(batch,)`)."""
    nb, n, _ = q.shape
    be = cfg.backend
    n_pad = _aligned(be, n, lane=True)
    stat = t1 if y is None else y
    stat_pad = (nb, n_pad, n_pad if y is None else _aligned(be, y.shape[-1], lane=True))
    t2_matrix = t2.ndim == 3
    sub, lane = _scalar_tile(be)
    c = jnp.zeros((nb,), _F32) if t2_matrix else t2.astype(_F32)
    scal = jnp.stack([c, old_l.astype(_F32), lr.astype(_F32)], axis=-1)
    scal = jnp.broadcast_to(_pad_to(scal[:, None, :], (nb, 1, lane)), (nb, sub, lane))

    def spec(shape):
        return pl.BlockSpec((None, *shape[1:]), lambda b: (b, 0, 0))

    operands = [scal, _pad_to(q, (nb, n_pad, n_pad)), _pad_to(stat, stat_pad)]
    if t2_matrix:
        operands.append(_pad_to(t2, (nb, n_pad, n_pad)))
    ks = {}
    for name, start in (("ell", start_ell), ("r", start_r)):
        k = 1 if start is None else start.shape[1]
        k_pad = _aligned(be, k, lane=False)
        ks[name] = (k, k_pad)
        if start is not None:
            operands.append(_pad_to(start.astype(_F32), (nb, k_pad, n_pad)))
    layout = _Layout(y is not None, t2_matrix, start_ell is not None, start_r is not None,
                     *ks["ell"], *ks["r"])
    out_shape = (jax.ShapeDtypeStruct((nb, n_pad, n_pad), q.dtype),
                 jax.ShapeDtypeStruct((nb, sub, lane), _F32))
    q_new, l_new = pl.pallas_call(
        ft.partial(_refit_kernel, cfg=cfg, layout=layout),
        out_shape=out_shape,
        grid=(nb,),
        in_specs=[spec(x.shape) for x in operands],
        out_specs=tuple(spec(s.shape) for s in out_shape),
        compiler_params=_compiler_params(be, n_pad),
        interpret=cfg.interpret,
        name=f"fused_refit_{cfg.geometry.lower()}",
    )(*operands)
    return q_new[:, :n, :n], l_new[:, 0, 0]


@ft.cache
def _stacked(cfg: _Config):
    """The launch, with a batching rule that folds a `vmap`ped axis into the stack axis:
    a nested stack is still one launch with a one-dimensional grid (the generic
    `pallas_call` batching rule would add a grid dimension that the TPU
    `dimension_semantics` does not describe)."""

    @jax.custom_batching.custom_vmap
    def run(q, t2, old_l, lr, t1, y, start_ell, start_r):
        return _forward(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg)

    @run.def_vmap
    def _rule(axis_size, in_batched, *args):
        flat = []
        for x, batched in zip(args, in_batched):
            if x is not None:
                x = x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                x = x.reshape(-1, *x.shape[2:])
            flat.append(x)
        q_new, l_new = run(*flat)
        out = (q_new.reshape(axis_size, -1, *q_new.shape[1:]), l_new.reshape(axis_size, -1))
        return out, (True, True)

    return run


@ft.partial(jax.custom_jvp, nondiff_argnums=(8,))
def _fused(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg: _Config):
    return _stacked(cfg)(q, t2, old_l, lr, t1, y, start_ell, start_r)


@_fused.defjvp
def _fused_jvp(cfg, primals, tangents):
    out = _fused(*primals, cfg)
    _, t_out = jax.jvp(ft.partial(_reference_batched, cfg=cfg), primals, tangents)
    return out, t_out


# -- arguments ---------------------------------------------------------------------------------


def _check_config(cfg: _Config) -> None:
    if cfg.geometry not in GEOMETRIES:
        raise ValueError(f"`geometry` must be one of {GEOMETRIES}; got {cfg.geometry!r}.")
    if cfg.bound not in BOUNDS:
        raise ValueError(f"`bound` must be one of {BOUNDS}; got {cfg.bound!r}.")
    if not 0.0 <= cfg.beta < 1.0:
        raise ValueError(f"`beta` must be in [0, 1); got {cfg.beta!r}.")
    if cfg.half_iters < 1:
        raise ValueError(f"`half_iters` must be >= 1; got {cfg.half_iters!r}.")
    if not cfg.max_step > 0.0:
        raise ValueError(f"`max_step` must be > 0; got {cfg.max_step!r}.")


def _check_start(start, name: str, batch: tuple[int, ...], n: int):
    if start is None:
        raise ValueError(f"`{name}` is required for bound='subspace'; got None.")
    start = jnp.asarray(start)
    check_dtype(name, start.dtype)
    if start.ndim != len(batch) + 2 or start.shape[:-2] != batch or start.shape[-1] != n:
        raise ValueError(f"`{name}` must have shape {(*batch, 'k', n)}; got {start.shape}.")
    if start.shape[-2] < 1:
        raise ValueError(f"`{name}` needs at least one row; got shape {start.shape}.")
    return start


def _check(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg: _Config):
    """Validate the arguments; return them batched (a leading stack axis, `lr` per factor),
    with the starts a bound does not use dropped."""
    _check_config(cfg)
    q = jnp.asarray(q)
    check_dtype("q", q.dtype)
    if q.ndim not in (2, 3) or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"`q` must be (n, n) or (batch, n, n); got shape {q.shape}.")
    batch, n = q.shape[:-2], q.shape[-1]
    if (t1 is None) == (y is None):
        raise ValueError("exactly one of `t1` and `y` must be given; got "
                         f"{'both' if t1 is not None else 'neither'}.")
    if t1 is not None:
        t1 = jnp.asarray(t1)
        check_dtype("t1", t1.dtype)
        if t1.shape != q.shape:
            raise ValueError(f"`t1` must have the shape of `q` {q.shape}; got {t1.shape}.")
    else:
        y = jnp.asarray(y)
        check_dtype("y", y.dtype)
        if y.ndim != q.ndim or y.shape[:-1] != q.shape[:-1] or y.shape[-1] < 1:
            raise ValueError(f"`y` must have shape {(*batch, n, 'm')}; got {y.shape}.")
    t2 = jnp.asarray(t2)
    check_dtype("t2", t2.dtype)
    if t2.shape not in (batch, q.shape):
        raise ValueError(f"`t2` must have shape {batch} (c·I) or {q.shape}; got {t2.shape}.")
    old_l = jnp.asarray(old_l)
    if old_l.shape != batch or not jnp.issubdtype(old_l.dtype, jnp.floating):
        raise ValueError(f"`old_l` must be a float array of shape {batch}; got "
                         f"{old_l.dtype}{list(old_l.shape)}.")
    lr = jnp.asarray(lr)
    if lr.shape not in ((), batch) or not jnp.issubdtype(lr.dtype, jnp.floating):
        raise ValueError(f"`lr` must be a float of shape () or {batch}; got "
                         f"{lr.dtype}{list(lr.shape)}.")
    if cfg.bound == "subspace":
        start_ell = _check_start(start_ell, "start_ell", batch, n)
        start_r = _check_start(start_r, "start_r", batch, n) if cfg.geometry == "PRO" else None
    else:  # the one-step bound is deterministic
        start_ell = start_r = None
    lr = jnp.broadcast_to(lr.astype(_F32), batch)
    args = (q, t2, old_l.astype(_F32), lr, t1, y, start_ell, start_r)
    if not batch:
        args = tuple(None if x is None else x[None] for x in args)
    return args


def fused_factor_refit(
    q: Float[Array, "..."],
    t2: Float[Array, "..."],
    old_l: Float[Array, "..."],
    lr: ArrayLike,
    *,
    t1: Float[Array, "..."] | None = None,
    y: Float[Array, "..."] | None = None,
    start_ell: Float[Array, "..."] | None = None,
    start_r: Float[Array, "..."] | None = None,
    geometry: str = "PRO",
    beta: float = 0.9,
    bound: str = "subspace",
    half_iters: int = 2,
    max_step: float = 1.0 / 8.0,
    backend: str = "gpu",
    interpret: Any = False,
    precision: Any = None,
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """The whole refit of a stack of dense factors in one Pallas launch.

    Per factor, exactly `psgd_eqx._geometry.fit_factor(geometry, q, t1, t2, old_l, lr, key,
    Normaliser(beta, bound, k, half_iters), dense=True)` with `k_ell, k_step =
    _rng.split(key)`, `start_ell = _rng.normal(k_ell, (k, n))`, `start_r =
    _rng.normal(k_step, (k, n))` and k = min(normaliser.k, n): the norm bound ℓ of T₁ + T₂,
    the Lipschitz estimate L and η = μ/L, and the geometry's step (see the module
    docstring). The working set of one factor must fit on chip: check
    [`fused_refit_fits`][psgd_eqx_kernels.fused_refit_fits] first.

    **Arguments:**

    - `q`: the factors, `(batch, n, n)` (or one `(n, n)`); float32 or bfloat16.
    - `t2`: T₂ per factor: `(batch,)` scalars c meaning c·I, or `(batch, n, n)` matrices.
    - `old_l`: the previous Lipschitz estimates, `(batch,)` float.
    - `lr`: the learning rate μ, a scalar or `(batch,)`.
    - `t1`: the statistics T₁, `(batch, n, n)`; or
    - `y`: `(batch, n, m)` with T₁ = y yᵀ (P·h with the factor's axis first, the other axes
        flattened). Exactly one of `t1`, `y`.
    - `start_ell`: `(batch, k, n)`, the random start of the bound of ℓ; required for
        `bound="subspace"`, ignored for `"one_step"`.
    - `start_r`: `(batch, k, n)`, the random start of the bound of R; required for `"PRO"`
        with `bound="subspace"`, ignored otherwise.
    - `geometry`: `"PRO"`, `"EQ"` or `"QUAD"`.
    - `beta`: the EMA factor β of L, in [0, 1).
    - `bound`: `"subspace"` or `"one_step"` (as `psgd_eqx.Normaliser`).
    - `half_iters`: half-iterations of the subspace bound (≥ 1).
    - `max_step`: the largest Procrustes step (`"PRO"`).
    - `backend`: `"gpu"` (Pallas Triton) or `"tpu"` (Mosaic TPU).
    - `interpret`: `False` (compiled), `True` (Pallas interpreter) or
        `pltpu.InterpretParams()` (TPU-semantics interpreter).
    - `precision`: `jax.lax.Precision` of the products (`None` = the backend's default,
        TF32 on GPU for float32).

    **Returns:** `(new q, new L)`: q in `q`'s dtype (computed in float32), L float32 of shape
    `(batch,)` (`()` for an unbatched `q`).

    Differentiable: the tangent is that of
    [`fused_factor_refit_reference`][psgd_eqx_kernels.fused_factor_refit_reference].
    """
    check_backend(backend)
    cfg = _Config(geometry, float(beta), bound, int(half_iters), float(max_step), backend,
                  interpret, precision)
    args = _check(q, t2, old_l, lr, t1, y, start_ell, start_r, cfg)
    return _unbatch(jnp.ndim(q), *_fused(*args, cfg))


def _unbatch(ndim: int, q_new, l_new):
    """Drop the stack axis `_check` added to an unbatched `(n, n)` factor."""
    return (q_new[0], l_new[0]) if ndim == 2 else (q_new, l_new)
