"""Pallas kernels (`psgd_eqx_kernels`) against their pure-jnp references.

On CPU every kernel runs interpreted: `interpret=True` for the GPU (Triton) variant and
`interpret=pltpu.InterpretParams()` for the TPU (Mosaic) variant. The compiled variants
(`interpret=False`) run only when the default backend is a GPU or TPU.
"""

import functools as ft

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import psgd_eqx_kernels as K
import pytest
from jax.experimental.pallas import tpu as pltpu


_BACKEND = jax.default_backend()
_HI = jax.lax.Precision.HIGHEST
# Small tiles so that the interpreted runs cover several tiles, partial (padded) tiles and
# several contraction steps at small n.
_GPU16 = K.BlockSizes(block_m=16, block_n=16, block_k=16)
_TPU128 = K.BlockSizes(block_m=128, block_n=128, block_k=128)

# Interpreted modes: (backend, interpret, block sizes)
_MODES = {
    "gpu-interpret": ("gpu", True, _GPU16),
    "gpu-interpret-default-blocks": ("gpu", True, None),
    "tpu-interpret": ("tpu", pltpu.InterpretParams(), _TPU128),
}

# Interpreted kernels are checked on CPU only (the jax convention: on an accelerator the
# compiled tests below run instead).
_CPU_ONLY = pytest.mark.skipif(_BACKEND != "cpu", reason="interpreted kernels run on CPU")

# The Triton backend warns on every lowering from JAX 0.11 on ("jax-pallas-triton").
_QUIET = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)


def _rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 2e-2


def _batch_shape(batch):
    return () if batch is None else (batch,)


def _eye(n, bs):
    return jnp.broadcast_to(jnp.eye(n), (*bs, n, n))


def _eq_inputs(key, n, batch, dtype):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bs = _batch_shape(batch)
    q = jnp.triu(jax.random.normal(k1, (*bs, n, n))) / n + _eye(n, bs)
    a = jax.random.normal(k2, (*bs, n, n))
    b = jax.random.normal(k3, (*bs, n, n))
    t1 = a @ jnp.swapaxes(a, -1, -2) / n
    t2 = b @ jnp.swapaxes(b, -1, -2) / n
    eta = jax.random.uniform(k4, bs, minval=0.05, maxval=0.2)
    return q.astype(dtype), t1.astype(dtype), t2.astype(dtype), eta


def _pro_inputs(key, n, batch, dtype):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    bs = _batch_shape(batch)
    q = jax.random.normal(k1, (*bs, n, n)) / (4 * n) + _eye(n, bs)
    a = jax.random.normal(k2, (*bs, n, n))
    t = a @ jnp.swapaxes(a, -1, -2) / n
    c = jax.random.uniform(k3, bs, minval=0.5, maxval=1.5)
    eta = jax.random.uniform(k4, bs, minval=0.05, maxval=0.2)
    return q.astype(dtype), t.astype(dtype), c, eta


def _kron_inputs(key, m, n, batch, dtype, left, right):
    k1, k2, k3 = jax.random.split(key, 3)
    bs = _batch_shape(batch)
    g = jax.random.normal(k1, (*bs, m, n)).astype(dtype)

    def factor(k, d, kind):
        if kind == "none":
            return None
        if kind == "diag":
            return (1.0 + 0.1 * jax.random.normal(k, (*bs, d))).astype(dtype)
        return (jax.random.normal(k, (*bs, d, d)) / d + _eye(d, bs)).astype(dtype)

    return g, factor(k2, m, left), factor(k3, n, right)


# -- the references define the maths of psgd_eqx --------------------------------------------


def test_eq_reference_is_dense_step(getkey):
    from psgd_eqx._geometry import dense_step
    from psgd_eqx._norms import Normaliser

    q, t1, t2, eta = _eq_inputs(getkey(), 24, None, jnp.float32)
    ref = K.eq_factor_update_reference(q, t1, t2, eta, precision=_HI)
    with jax.default_matmul_precision("highest"):
        geo = dense_step("EQ", q, t1, t2, eta, getkey(), Normaliser())
    assert _rel_err(ref, geo) < 1e-6


# the one-step bound is checked against fit_factor by tests/test_fused_refit.py too
@pytest.mark.parametrize("bound", [pytest.param("one_step", marks=pytest.mark.slow),
                                   "subspace"])
def test_pro_reference_is_dense_step(getkey, bound):
    from psgd_eqx._geometry import dense_step
    from psgd_eqx._norms import Normaliser

    q, t, c, eta = _pro_inputs(getkey(), 24, None, jnp.float32)
    normaliser = Normaliser(bound=bound)
    key = getkey()
    ref = K.pro_factor_update_reference(
        q, t, c, eta, key, norm_bound=normaliser.norm_lower_bound, precision=_HI
    )
    with jax.default_matmul_precision("highest"):
        geo = dense_step("PRO", q, t, c, eta, key, normaliser)
    assert _rel_err(ref, geo) < 1e-6
    if bound == "one_step":  # the package's own default bound is the same function
        ours = K.pro_factor_update_reference(q, t, c, eta, precision=_HI)
        assert _rel_err(ours, geo) < 1e-6


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("sides", [("dense", "dense"), ("diag", "dense"), ("dense", "diag")])
def test_kron_reference_is_kronq_einsum(getkey, cached, sides):
    from psgd_eqx._precond.kron import _apply_einsum

    g, ql, qr = _kron_inputs(getkey(), 12, 20, None, jnp.float32, *sides)
    ops = []
    for q, kind in ((ql, sides[0]), (qr, sides[1])):
        if kind == "diag":
            ops.append(q * q)
        elif cached:
            ops.append(q.T @ q)
        else:
            ops.extend([q, q])
    spec = _apply_einsum(tuple(k == "dense" for k in sides), cached)
    einsum = jnp.einsum(spec, *ops, g, precision=_HI)
    if cached:
        ql = ql.T @ ql if sides[0] == "dense" else ql
        qr = qr.T @ qr if sides[1] == "dense" else qr
    ref = K.kron_apply_reference(g, ql, qr, cached=cached, precision=_HI)
    assert _rel_err(ref, einsum) < 1e-5


# -- kernels (interpreted) against the references -------------------------------------------

# (mode, n, batch): one tile, unaligned and batched (several tiles, padded), multi-tile with
# the default blocks, and the TPU variant on 128-tiles.
_UPDATE_CASES = [
    ("gpu-interpret", 8, None),
    ("gpu-interpret", 40, 2),
    ("gpu-interpret-default-blocks", 130, None),
    ("tpu-interpret", 130, 2),
]


@_CPU_ONLY
@pytest.mark.parametrize("fuse", [False, True], ids=["E-pass", "fused-E"])
@pytest.mark.parametrize("mode,n,batch", _UPDATE_CASES)
def test_eq_factor_update(getkey, mode, n, batch, fuse):
    backend, interpret, blocks = _MODES[mode]
    q, t1, t2, eta = _eq_inputs(getkey(), n, batch, jnp.float32)
    out = K.eq_factor_update(q, t1, t2, eta, block_sizes=blocks, backend=backend,
                             interpret=interpret, precision=_HI, fuse_difference=fuse)
    ref = K.eq_factor_update_reference(q, t1, t2, eta, precision=_HI)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 1e-5
    assert bool(jnp.all(jnp.tril(out, -1) == 0))


def _slow_after(cases, keep: int):
    """The first `keep` cases in the default run, the rest with -m slow (the tiled `PRO`
    update and Kron apply are callable directly but dispatched by no optimizer)."""
    return list(cases[:keep]) + [pytest.param(*(c if isinstance(c, tuple) and len(c) == 3
                                                else (c,)), marks=pytest.mark.slow)
                                 for c in cases[keep:]]


@_CPU_ONLY
@pytest.mark.parametrize("mode,n,batch", _slow_after(_UPDATE_CASES, 2))
def test_pro_factor_update(getkey, mode, n, batch):
    backend, interpret, blocks = _MODES[mode]
    q, t, c, eta = _pro_inputs(getkey(), n, batch, jnp.float32)
    out = K.pro_factor_update(q, t, c, eta, block_sizes=blocks, backend=backend,
                              interpret=interpret, precision=_HI)
    ref = K.pro_factor_update_reference(q, t, c, eta, precision=_HI)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < 1e-5


_KRON_CASES = [
    # (m, n, batch, left, right, cached, triangular)
    (8, 8, None, "dense", "dense", False, False),
    (40, 24, 2, "dense", "dense", False, False),
    (24, 40, 2, "dense", "dense", True, False),
    (40, 24, None, "diag", "dense", False, False),
    (24, 40, 2, "dense", "diag", False, True),
    (40, 24, 2, "diag", "diag", False, False),
    (40, 24, None, "none", "dense", False, False),
    (130, 72, None, "dense", "dense", False, True),
]


@_CPU_ONLY
@pytest.mark.parametrize("case", _slow_after(_KRON_CASES, 4), ids=lambda c: "-".join(map(str, c)))
def test_kron_apply(getkey, case):
    m, n, batch, left, right, cached, triangular = case
    g, ql, qr = _kron_inputs(getkey(), m, n, batch, jnp.float32, left, right)
    blocks = None if max(m, n) > 100 else _GPU16
    out = K.kron_apply(g, ql, qr, cached=cached, triangular=triangular, block_sizes=blocks,
                       backend="gpu", interpret=True, precision=_HI)
    ref = K.kron_apply_reference(g, ql, qr, cached=cached, triangular=triangular, precision=_HI)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert _rel_err(out, ref) < 1e-5


@_CPU_ONLY
@pytest.mark.parametrize(
    "blocks", [K.BlockSizes(32, 16, 16), K.BlockSizes(16, 32, 16)], ids=["32x16x16", "16x32x16"]
)
def test_triangular_skipping_with_unequal_blocks(getkey, blocks):
    # Non-square tiles: the skipped and the masked (peeled) contraction steps differ per tile.
    kw = dict(block_sizes=blocks, interpret=True, precision=_HI)
    args = _eq_inputs(getkey(), 72, None, jnp.float32)
    out = K.eq_factor_update(*args, **kw)
    assert _rel_err(out, K.eq_factor_update_reference(*args, precision=_HI)) < 1e-5
    g, ql, qr = _kron_inputs(getkey(), 72, 40, None, jnp.float32, "dense", "dense")
    out = K.kron_apply(g, ql, qr, triangular=True, **kw)
    ref = K.kron_apply_reference(g, ql, qr, triangular=True, precision=_HI)
    assert _rel_err(out, ref) < 1e-5


@_CPU_ONLY
@pytest.mark.parametrize("triangular", [True])
def test_kron_apply_tpu_interpret(getkey, triangular):
    g, ql, qr = _kron_inputs(getkey(), 130, 24, 2, jnp.float32, "dense", "dense")
    kw = dict(triangular=triangular, precision=_HI)
    out = K.kron_apply(g, ql, qr, block_sizes=_TPU128, backend="tpu",
                       interpret=pltpu.InterpretParams(), **kw)
    assert _rel_err(out, K.kron_apply_reference(g, ql, qr, **kw)) < 1e-5


@_CPU_ONLY
def test_kron_apply_triangular_ignores_lower_part(getkey):
    g, ql, qr = _kron_inputs(getkey(), 40, 24, None, jnp.float32, "dense", "dense")
    noise = jax.random.normal(getkey(), ql.shape)
    dirty = ql + jnp.tril(noise, -1)
    kw = dict(triangular=True, block_sizes=_GPU16, interpret=True, precision=_HI)
    clean = K.kron_apply(g, jnp.triu(ql), qr, **kw)
    assert _rel_err(K.kron_apply(g, dirty, qr, **kw), clean) < 1e-6


@_CPU_ONLY
@pytest.mark.parametrize("op", ["eq", "eq_fused", "pro", "kron"])
def test_bf16_inputs_f32_accumulation(getkey, op):
    key = getkey()
    kw = dict(block_sizes=_GPU16, interpret=True)
    if op.startswith("eq"):
        args = _eq_inputs(key, 40, 2, jnp.bfloat16)
        out = K.eq_factor_update(*args, **kw, fuse_difference=op == "eq_fused")
        ref = K.eq_factor_update_reference(*args)
        ref64 = K.eq_factor_update_reference(*(jnp.asarray(a, jnp.float32) for a in args),
                                             precision=_HI)
    elif op == "pro":
        args = _pro_inputs(key, 40, 2, jnp.bfloat16)
        out = K.pro_factor_update(*args, **kw)
        ref = K.pro_factor_update_reference(*args)
        ref64 = K.pro_factor_update_reference(*(jnp.asarray(a, jnp.float32) for a in args),
                                              precision=_HI)
    else:
        args = _kron_inputs(key, 40, 24, 2, jnp.bfloat16, "dense", "dense")
        out = K.kron_apply(*args, **kw)
        ref = K.kron_apply_reference(*args)
        ref64 = K.kron_apply_reference(*(jnp.asarray(a, jnp.float32) for a in args),
                                       precision=_HI)
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, ref) < 1e-2
    # f32 accumulation: the error is that of the bf16 inputs/output, not of a bf16 sum.
    assert _rel_err(out, ref64) < 1e-2


@_CPU_ONLY
def test_vmap_and_jit(getkey):
    q, t1, t2, eta = _eq_inputs(getkey(), 24, 3, jnp.float32)
    fn = jax.jit(jax.vmap(ft.partial(K.eq_factor_update, block_sizes=_GPU16, interpret=True,
                                     precision=_HI)))
    ref = K.eq_factor_update_reference(q, t1, t2, eta, precision=_HI)
    assert _rel_err(fn(q, t1, t2, eta), ref) < 1e-5


# -- gradients through the custom rules -----------------------------------------------------


def _grads(fn, args, argnums):
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))
    return jax.jit(jax.grad(loss, argnums=argnums))(*args)


@_CPU_ONLY
@pytest.mark.parametrize("op", ["eq", "pro", "kron"])
def test_grad_matches_reference(getkey, op):
    # Shapes and blocks as in the forward tests above, so the kernels' compilations are reused.
    kw = dict(block_sizes=_GPU16, interpret=True, precision=_HI)
    if op == "eq":
        args = _eq_inputs(getkey(), 40, 2, jnp.float32)
        kern, ref, argnums = K.eq_factor_update, K.eq_factor_update_reference, (0, 1, 2, 3)
    elif op == "pro":
        args = _pro_inputs(getkey(), 8, None, jnp.float32)
        kern, ref, argnums = K.pro_factor_update, K.pro_factor_update_reference, (0, 1, 2, 3)
    else:
        args = _kron_inputs(getkey(), 40, 24, None, jnp.float32, "diag", "dense")
        kern, ref, argnums = K.kron_apply, K.kron_apply_reference, (0, 1, 2)
    g_kern = _grads(ft.partial(kern, **kw), args, argnums)
    g_ref = _grads(ft.partial(ref, precision=_HI), args, argnums)
    for a, b in zip(g_kern, g_ref):
        assert _rel_err(a, b) < 1e-5


# -- block sizes and argument validation ----------------------------------------------------


@pytest.mark.parametrize(
    "blocks,match",
    [
        (K.BlockSizes(block_m=48), "`block_m`=48 must be a power of two"),
        (K.BlockSizes(block_n=96), "`block_n`=96 must be a power of two"),
        (K.BlockSizes(block_k=8), "`block_k`=8 must be at least 16"),
        (K.BlockSizes(block_m=0), "`block_m` must be a positive int"),
        (K.BlockSizes(num_warps=3), "`num_warps` must be a power of two"),
        (K.BlockSizes(num_stages=0), "`num_stages` must be a positive int"),
    ],
)
def test_gpu_block_validation(blocks, match):
    with pytest.raises(ValueError, match=match):
        blocks.validate("gpu")
    q = jnp.eye(32)
    with pytest.raises(ValueError, match=match):
        K.eq_factor_update(q, q, q, jnp.asarray(0.1), block_sizes=blocks, interpret=True)


@pytest.mark.parametrize(
    "blocks,match",
    [
        (K.BlockSizes(12, 128, 128), "`block_m`=12 must be a multiple of 8"),
        (K.BlockSizes(8, 64, 128), "`block_n`=64 must be a multiple of 128"),
        (K.BlockSizes(8, 128, 200), "`block_k`=200 must be a multiple of 128"),
    ],
)
def test_tpu_block_validation(blocks, match):
    with pytest.raises(ValueError, match=match):
        blocks.validate("tpu")
    q = jnp.eye(32)
    with pytest.raises(ValueError, match=match):
        K.pro_factor_update(q, q, jnp.asarray(1.0), jnp.asarray(0.1), block_sizes=blocks,
                            backend="tpu", interpret=pltpu.InterpretParams())


def test_tpu_transposed_operand_needs_lane_aligned_block_m():
    # kron_apply reads Q_lᵀ: block_m becomes the last dim of a tile on TPU.
    blocks = K.BlockSizes(block_m=8, block_n=128, block_k=128)
    blocks.validate("tpu")  # fine for untransposed products
    g, q = jnp.ones((16, 16)), jnp.eye(16)
    with pytest.raises(ValueError, match="`block_m`=8 must be a multiple of 128"):
        K.kron_apply(g, q, None, block_sizes=blocks, backend="tpu",
                     interpret=pltpu.InterpretParams())


def test_argument_validation():
    # Shape errors are caught by jaxtyping when its import hook is on (as in this suite),
    # else by the wrappers' own checks.
    shape_error = (ValueError, jaxtyping.TypeCheckError)
    q = jnp.eye(8)
    with pytest.raises(ValueError, match="`backend`"):
        K.eq_factor_update(q, q, q, jnp.asarray(0.1), backend="cuda")
    with pytest.raises(shape_error, match="t2"):
        K.eq_factor_update(q, q, jnp.eye(9), jnp.asarray(0.1))
    with pytest.raises(shape_error, match="eta"):
        K.eq_factor_update(q, q, q, jnp.ones(3))
    with pytest.raises(ValueError, match="`q` must be float32 or bfloat16"):
        K.eq_factor_update(q.astype(jnp.float16), q, q, jnp.asarray(0.1))
    with pytest.raises(shape_error, match="qr"):
        K.kron_apply(jnp.ones((8, 4)), q, jnp.eye(5))
    with pytest.raises(ValueError, match="`triangular=True` needs `cached=False`"):
        K.kron_apply(jnp.ones((8, 4)), q, None, cached=True, triangular=True)
    with pytest.raises(ValueError, match="`key` is required"):
        K.pro_factor_update(q, q, jnp.asarray(1.0), jnp.asarray(0.1),
                            norm_bound=K.one_step_norm_bound)
    with pytest.raises(ValueError, match="`op` must be one of"):
        K.should_use_kernel("matmul", 128, 1)
    with pytest.raises(shape_error, match="fuse_difference"):
        K.eq_factor_update(q, q, q, jnp.asarray(0.1), fuse_difference="yes")


def test_should_use_kernel():
    # The documented measurement (kron's `use_kernels`): on GPU only the EQ factor update
    # beats XLA, for n >= 2048 with one factor.
    assert K.should_use_kernel("eq_factor_update", 2048, 1)
    assert K.should_use_kernel("eq_factor_update", 4096, 1)
    assert not K.should_use_kernel("eq_factor_update", 2047, 1)
    assert not K.should_use_kernel("eq_factor_update", 128, 1)
    assert K.should_use_kernel("eq_factor_update", 4096, 32)
    assert not K.should_use_kernel("pro_factor_update", 4096, 32)
    assert not K.should_use_kernel("kron_apply", 1 << 16, 1)
    # the fused refit and apply are unmeasured on hardware: never under "auto"
    assert not K.should_use_kernel("fused_factor_refit", 1024, 32)
    assert not K.should_use_kernel("fused_kron_apply", 1024, 32)
    assert set(K.KERNEL_MIN_N) == {"eq_factor_update", "pro_factor_update", "kron_apply",
                                   "fused_factor_refit", "fused_kron_apply"}


@pytest.mark.parametrize("op", sorted(K.KERNEL_MIN_N))
def test_should_use_kernel_follows_the_measured_thresholds(op):
    table = K.KERNEL_MIN_N[op]
    assert table and all(isinstance(b, int) and b >= 1 for b in table)
    for batch, threshold in sorted(table.items()):
        if threshold is None:  # never measured faster: always the reference
            for n in (1, 128, 4096, 1 << 20):
                assert K.should_use_kernel(op, n, batch) is False, (op, n, batch)
            continue
        assert K.should_use_kernel(op, threshold, batch) is True
        assert K.should_use_kernel(op, 2 * threshold, batch) is True
        assert K.should_use_kernel(op, threshold - 1, batch) is False
        assert K.should_use_kernel(op, threshold // 2, batch) is False
        # TPU is not measured: never, whatever the size
        assert K.should_use_kernel(op, 2 * threshold, batch, backend="tpu") is False


def test_should_use_kernel_uses_the_nearest_measured_stack_at_or_below():
    table = K.KERNEL_MIN_N["eq_factor_update"]
    sizes = sorted(table)
    assert len(sizes) >= 2 and len({table[b] for b in sizes}) >= 2  # distinct thresholds
    for lo, hi in zip(sizes, sizes[1:] + [10 * sizes[-1]]):
        for batch in (lo, (lo + hi) // 2, hi - 1):
            if batch < lo:
                continue
            t = table[lo]
            assert K.should_use_kernel("eq_factor_update", t, batch) is True, (batch, t)
            assert K.should_use_kernel("eq_factor_update", t - 1, batch) is False, (batch, t)
    # a batch of 0 reads as 1 (one unbatched factor)
    t1 = table[min(sizes)]
    assert K.should_use_kernel("eq_factor_update", t1, 0) is True
    assert K.should_use_kernel("eq_factor_update", t1 - 1, 0) is False


def test_should_use_kernel_rejects_unknown_ops_and_backends():
    for op in ("matmul", "eq", "", "EQ_FACTOR_UPDATE"):
        with pytest.raises(ValueError, match="`op` must be one of"):
            K.should_use_kernel(op, 4096, 1)
    for backend in ("cuda", "cpu", "GPU"):
        with pytest.raises(ValueError, match="`backend`"):
            K.should_use_kernel("eq_factor_update", 4096, 1, backend=backend)


def test_default_block_sizes_are_valid():
    for backend in ("gpu", "tpu"):
        for dtype in (jnp.float32, jnp.bfloat16):
            for n, batch in ((8, 1), (130, 1), (512, 32), (4096, 1)):
                K.default_block_sizes(backend, dtype, n, batch).validate(backend)


# -- compiled kernels (GPU/TPU only) ---------------------------------------------------------

_COMPILED = _BACKEND in ("gpu", "tpu")
_needs_accel = pytest.mark.skipif(not _COMPILED, reason="compiled Pallas needs a GPU or TPU")
_CBACKEND = "tpu" if _BACKEND == "tpu" else "gpu"


@_QUIET
@_needs_accel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,batch", [(8, None), (32, 4), (130, None), (256, 8), (1000, 2)])
def test_compiled_eq_and_pro(getkey, dtype, n, batch):
    prec = _HI if dtype == jnp.float32 else None
    args = _eq_inputs(getkey(), n, batch, dtype)
    ref = K.eq_factor_update_reference(*args, precision=prec)
    for fuse in (False, True):
        out = K.eq_factor_update(*args, backend=_CBACKEND, precision=prec, fuse_difference=fuse)
        assert _rel_err(out, ref) < _tol(dtype)
        assert bool(jnp.all(jnp.tril(out, -1) == 0))
    args = _pro_inputs(getkey(), n, batch, dtype)
    out = K.pro_factor_update(*args, backend=_CBACKEND, precision=prec)
    ref = K.pro_factor_update_reference(*args, precision=prec)
    assert _rel_err(out, ref) < _tol(dtype)


@_QUIET
@_needs_accel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "case",
    [
        (8, 8, None, "dense", "dense", False, False),
        (130, 72, 3, "dense", "dense", False, False),
        (130, 72, 3, "dense", "dense", False, True),
        (256, 512, None, "dense", "dense", True, False),
        (200, 64, 2, "diag", "dense", False, False),
        (64, 200, 2, "dense", "diag", False, True),
        (300, 500, 2, "diag", "diag", False, False),
    ],
    ids=lambda c: "-".join(map(str, c)),
)
def test_compiled_kron_apply(getkey, dtype, case):
    m, n, batch, left, right, cached, triangular = case
    g, ql, qr = _kron_inputs(getkey(), m, n, batch, dtype, left, right)
    prec = _HI if dtype == jnp.float32 else None
    kw = dict(cached=cached, triangular=triangular, precision=prec)
    out = K.kron_apply(g, ql, qr, backend=_CBACKEND, **kw)
    ref = K.kron_apply_reference(g, ql, qr, **kw)
    assert _rel_err(out, ref) < _tol(dtype)


@_QUIET
@_needs_accel
def test_compiled_default_precision_is_tf32_close(getkey):
    # precision=None is TF32 for f32 on GPU (like XLA's default): ~1e-3 relative.
    args = _eq_inputs(getkey(), 512, 4, jnp.float32)
    out = K.eq_factor_update(*args, backend=_CBACKEND)
    ref = K.eq_factor_update_reference(*args, precision=_HI)
    assert _rel_err(out, ref) < 5e-3


@_QUIET
@_needs_accel
def test_compiled_grad(getkey):
    args = _eq_inputs(getkey(), 64, 2, jnp.float32)
    kern = ft.partial(K.eq_factor_update, backend=_CBACKEND, precision=_HI)
    ref = ft.partial(K.eq_factor_update_reference, precision=_HI)
    for a, b in zip(_grads(kern, args, (0, 1)), _grads(ref, args, (0, 1))):
        assert _rel_err(a, b) < 1e-5


@_QUIET
@_needs_accel
@pytest.mark.slow
@pytest.mark.parametrize("n", [2048, 4096])
def test_compiled_large(getkey, n):
    args = _eq_inputs(getkey(), n, 2, jnp.float32)
    out = K.eq_factor_update(*args, backend=_CBACKEND, precision=_HI)
    assert _rel_err(out, K.eq_factor_update_reference(*args, precision=_HI)) < 1e-5
