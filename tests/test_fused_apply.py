"""`fused_kron_apply` (one Pallas launch for P·G over a stack) against its reference.

The reference is checked against `psgd_eqx.KronQ.apply` itself (every side kind, a stored-P
geometry); the kernel runs interpreted on CPU (`interpret=True` for the GPU variant,
`pltpu.InterpretParams()` for the TPU variant) on unaligned shapes, so padding is always
exercised. Compiled runs need a GPU/TPU and are not part of this file; the lowering to
Triton / Mosaic IR is checked on CPU.
"""

import functools as ft
import itertools
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from psgd_eqx_kernels import _fused_apply as F
from psgd_eqx_kernels._fused_apply import (
    fused_apply_fits,
    fused_kron_apply,
    fused_kron_apply_reference,
)


_HI = jax.lax.Precision.HIGHEST
_CPU_ONLY = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="interpreted kernels run on CPU"
)
_MODES = {"gpu": True, "tpu": pltpu.InterpretParams()}
_KINDS = ("dense", "cached", "diag", None)
_SHAPE_ERRORS = (ValueError, jaxtyping.TypeCheckError)


@pytest.fixture
def rng(request):
    # numpy draws, seeded per test: eager jax.random compiles anew for every shape, which
    # would dominate this file's runtime.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _rel_err(out, ref):
    out = np.asarray(out).astype(np.float64)
    ref = np.asarray(ref).astype(np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def _tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 1e-2


def _factor(rng, kind, bs, d, dtype=jnp.float32):
    """A random, non-identity (and non-symmetric: transposes matter) factor of a side."""
    if kind is None:
        return None
    if kind == "diag":  # signs and spread: |q|² and q differ
        return jnp.asarray(1.0 + 0.5 * rng.standard_normal((*bs, d)), dtype)
    return jnp.asarray(np.eye(d) + rng.standard_normal((*bs, d, d)) / d, dtype)


def _side(kind, q):
    return None if kind is None else (kind, q)


def _inputs(rng, m, n, batch, kinds, g_dtype=jnp.float32, f_dtype=jnp.float32):
    bs = () if batch is None else (batch,)
    g = jnp.asarray(rng.standard_normal((*bs, m, n)), g_dtype)
    ql = _factor(rng, kinds[0], bs, m, f_dtype)
    qr = _factor(rng, kinds[1], bs, n, f_dtype)
    return g, _side(kinds[0], ql), _side(kinds[1], qr)


# -- 1. the reference is KronQ.apply ---------------------------------------------------------


def _kronq(shape, kinds, factors, geometry):
    """A KronQ on `shape` (one axis per non-None kind) with the given factors set.

    `factors` are Q (dense), q (diag) or, for kind "cached", Q of a cached-P geometry (the
    cache is set to QᵀQ) or P itself of a stored-P geometry.
    """
    import psgd_eqx

    kq = psgd_eqx.KronQ.init(shape, dense=tuple(k != "diag" for k in kinds), geometry=geometry,
                             cache_preconditioner="cached" in kinds)
    kq = eqx.tree_at(lambda k: k.factors, kq, tuple(factors))
    if kq.cache is not None:
        cache = tuple(f.T @ f if k == "cached" else None for k, f in zip(kinds, factors))
        kq = eqx.tree_at(lambda k: k.cache, kq, cache, is_leaf=lambda x: x is None)
    return kq


def _stack(modules):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *modules)


def _psgd_apply(g, kinds, factors, geometry):
    """P·G for a stack by `KronQ.apply`: one 2-D KronQ where it can express the pair of
    kinds, else one 1-D KronQ per side (vmapped over the other axis)."""
    batch, m, n = g.shape
    apply = jax.vmap(lambda q, x: q.apply(x))
    if None not in kinds and set(kinds) != {"dense", "cached"}:
        kq = _stack([_kronq((m, n), kinds, [f[b] for f in factors], geometry)
                     for b in range(batch)])
        return apply(kq, g)
    x = g
    for axis, (kind, f, d) in enumerate(zip(kinds, factors, (m, n))):
        if kind is None:
            continue
        kq = _stack([_kronq((d,), (kind,), [f[b]], geometry) for b in range(batch)])
        along = jax.vmap(lambda q, col: q.apply(col), in_axes=(None, 1 - axis),
                         out_axes=1 - axis)
        x = jax.vmap(along)(kq, x)
    return x


_PAIRS = [p for p in itertools.product(_KINDS, _KINDS) if p != (None, None)]
_STORED_P = [p for p in itertools.product(("cached", "diag", None), repeat=2)
             if p != (None, None)]


@pytest.mark.parametrize(
    "geometry,kinds",
    [("PRO", p) for p in _PAIRS] + [("PRO4P", p) for p in _STORED_P[:3]]
    + [pytest.param("PRO4P", p, marks=pytest.mark.slow) for p in _STORED_P[3:]],
    ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)),
)
def test_reference_is_kronq_apply(rng, geometry, kinds):
    m, n, batch = 6, 9, 3
    g = jnp.asarray(rng.standard_normal((batch, m, n)), jnp.float32)
    factors = [_factor(rng, k, (batch,), d) for k, d in zip(kinds, (m, n))]
    stored_p = geometry == "PRO4P"
    sides = []
    for k, f in zip(kinds, factors):
        # PRO caches P = QᵀQ; PRO4P's dense factor is P itself (not symmetric here, so the
        # transpose convention of the right side is checked too).
        if k == "cached" and not stored_p:
            f = jnp.swapaxes(f, -1, -2) @ f
        sides.append(_side(k, f))
    with jax.default_matmul_precision("highest"):
        want = _psgd_apply(g, kinds, factors, geometry)
    ref = fused_kron_apply_reference(g, *sides, diag_is_p=stored_p, precision=_HI)
    assert ref.shape == g.shape and ref.dtype == g.dtype
    assert _rel_err(ref, want) < 1e-5
    assert _rel_err(ref, g) > 1e-2  # the factors are not the identity


# -- 2. the kernel is the reference ----------------------------------------------------------

# (backend, (m, n), batch, g dtype, factor dtype, left, right). Every pair of kinds runs on
# the GPU variant, a mix on the TPU variant; shapes, stack sizes and dtypes rotate.
_SHAPES = [(5, 7), (40, 130), (130, 40)]
_DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
           (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)]
_TPU_PAIRS = [("dense", "dense"), ("cached", "diag"), ("diag", "dense"), (None, "cached"),
              ("dense", None), ("diag", "diag")]


def _cases(backend, pairs, offset):
    cases = []
    for idx, pair in enumerate(pairs):
        r = idx + offset
        cases.append((backend, _SHAPES[r % 3], (1, 3)[r % 2], *_DTYPES[r % 4], *pair))
    return cases


# default run: every pair on one of the two backends (the GPU variant for the pairs the
# TPU list lacks); the remaining GPU pairs and every TPU pair run with -m slow
_GPU_DEFAULT = [p for p in _PAIRS if p not in _TPU_PAIRS]
_KERNEL_CASES = _cases("gpu", _GPU_DEFAULT, 0) + _cases("tpu", _TPU_PAIRS, 1)
_SLOW_CASES = (_cases("tpu", [p for p in _PAIRS if p not in _TPU_PAIRS], 2)
               + _cases("gpu", _TPU_PAIRS, 3))


def _case_id(case):
    backend, (m, n), batch, gd, fd, left, right = case
    return f"{backend}-{m}x{n}-b{batch}-{jnp.dtype(gd).name}-{jnp.dtype(fd).name}-{left}-{right}"


def _check_kernel(rng, case, diag_is_p=False):
    backend, (m, n), batch, g_dtype, f_dtype, left, right = case
    g, ls, rs = _inputs(rng, m, n, batch, (left, right), g_dtype, f_dtype)
    out = fused_kron_apply(g, ls, rs, diag_is_p=diag_is_p, backend=backend,
                           interpret=_MODES[backend], precision=_HI)
    ref = fused_kron_apply_reference(g, ls, rs, diag_is_p=diag_is_p, precision=_HI)
    assert out.shape == g.shape and out.dtype == g.dtype
    assert _rel_err(out, ref) < _tol(g_dtype)
    if g_dtype == jnp.bfloat16 or f_dtype == jnp.bfloat16:
        # f32 accumulation: within bf16 rounding of the all-f32 result
        up = [None if s is None else (s[0], s[1].astype(jnp.float32)) for s in (ls, rs)]
        ref32 = fused_kron_apply_reference(g.astype(jnp.float32), *up, diag_is_p=diag_is_p,
                                           precision=_HI)
        assert _rel_err(out, ref32) < 1e-2


@_CPU_ONLY
@pytest.mark.parametrize("case", _KERNEL_CASES, ids=_case_id)
def test_kernel_matches_reference(rng, case):
    _check_kernel(rng, case)


@_CPU_ONLY
@pytest.mark.slow
@pytest.mark.parametrize("case", _SLOW_CASES, ids=_case_id)
def test_kernel_matches_reference_remaining_pairs(rng, case):
    _check_kernel(rng, case)


@_CPU_ONLY
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernel_diag_is_p_and_unbatched(rng, backend):
    # stored-P: P itself on one side (cached), P's diagonal on the other; g unbatched.
    case = (backend, (40, 130), None, jnp.float32, jnp.float32, "diag", "cached")
    _check_kernel(rng, case, diag_is_p=True)
    g, ls, rs = _inputs(rng, 40, 130, None, ("diag", "cached"))
    kw = dict(backend=backend, interpret=_MODES[backend], precision=_HI)
    # diag_is_p changes the result (q vs q²): the flag reaches the kernel
    assert _rel_err(fused_kron_apply(g, ls, rs, diag_is_p=True, **kw),
                    fused_kron_apply(g, ls, rs, **kw)) > 1e-2


def test_plan_covers_both_product_orders():
    # Forming P = QᵀQ in the kernel pays when the factor's dim is below the other dim.
    for backend in ("gpu", "tpu"):
        wide = F._plan(40, 130, "dense", "dense", backend, 4, F._BUDGETS[backend])
        tall = F._plan(130, 40, "dense", "dense", backend, 4, F._BUDGETS[backend])
        assert (wide.form_left, wide.form_right) == (True, False)
        assert (tall.form_left, tall.form_right) == (False, True)
    small = F._plan(5, 7, "dense", "dense", "gpu", 4, F._BUDGETS["gpu"])
    assert (small.mp, small.np_, small.form_left, small.form_right) == (16, 16, False, False)


@_CPU_ONLY
@pytest.mark.parametrize(
    "backend,m,n,kinds,budget",
    [("gpu", 40, 130, ("dense", "diag"), 40_000),  # column tiles, P not formed any more
     ("tpu", 130, 40, ("diag", "dense"), 400_000),  # row tiles, rows padded to the tile
     ("tpu", 40, 300, ("diag", None), 20_000)],  # both dims tiled
)
def test_tiled_grid(rng, monkeypatch, backend, m, n, kinds, budget):
    # A small budget forces the tiling of the diagonal / absent side's dim.
    monkeypatch.setitem(F._BUDGETS, backend, budget)
    names = [F._NONE if k is None else k for k in kinds]
    plan = F._plan(m, n, *names, backend, 4, budget)
    full = F._plan(m, n, *names, backend, 4, 2**40)
    assert plan.tm * plan.tn < full.tm * full.tn
    if kinds[0] == "dense":
        assert full.form_left and not plan.form_left
    g, ls, rs = _inputs(rng, m, n, 1, kinds)
    out = fused_kron_apply(g, ls, rs, backend=backend, interpret=_MODES[backend],
                           precision=_HI)
    ref = fused_kron_apply_reference(g, ls, rs, precision=_HI)
    assert _rel_err(out, ref) < 1e-5


# -- 3. one launch, lowering, validation, fits, jvp, vmap --------------------------------------


def _launches(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call[")


def test_one_launch():
    import psgd_eqx_kernels as K

    g, q = jnp.ones((2, 24, 40)), jnp.ones((2, 24))
    qr = jnp.ones((2, 40, 40))
    fused = ft.partial(fused_kron_apply, interpret=True)
    assert _launches(lambda g, a, b: fused(g, ("dense", a), ("dense", b)),
                     g, jnp.ones((2, 24, 24)), qr) == 1
    assert _launches(lambda g, a, b: fused(g, ("diag", a), ("cached", b)), g, q, qr) == 1
    assert _launches(lambda g: fused(g, None, None), g) == 0
    # today's chain: one launch per dense product
    assert _launches(lambda g, a, b: K.kron_apply(g, a, b, interpret=True),
                     g, jnp.ones((2, 24, 24)), qr) == 4


@pytest.mark.parametrize("backend,platform,marker",
                         [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
def test_lowers_for_the_hardware(backend, platform, marker):
    # The Pallas → Mosaic / Triton lowering runs in Python, so it is checked here; the
    # hardware compilers after it are not.
    for (kl, kr), (m, n), dtypes in (
        (("dense", "dense"), (40, 130), (jnp.float32, jnp.bfloat16)),
        (("diag", "cached"), (130, 40), (jnp.bfloat16, jnp.bfloat16)),
    ):
        g, ls, rs = _inputs(np.random.default_rng(0), m, n, 2, (kl, kr), *dtypes)

        def fn(g, a, b, kl=kl, kr=kr):
            return fused_kron_apply(g, (kl, a), (kr, b), backend=backend)

        lowered = jax.jit(fn).trace(g, ls[1], rs[1]).lower(lowering_platforms=(platform,))
        assert marker in lowered.as_text().lower()


def test_argument_validation():
    g = jnp.ones((3, 5, 7))
    dense_l, diag_r = ("dense", jnp.ones((3, 5, 5))), ("diag", jnp.ones((3, 7)))
    with pytest.raises(ValueError, match="`backend`"):
        fused_kron_apply(g, dense_l, diag_r, backend="cuda")
    with pytest.raises(ValueError, match="`left` kind must be one of .*'full'"):
        fused_kron_apply(g, ("full", jnp.ones((3, 5, 5))), None)
    with pytest.raises(_SHAPE_ERRORS, match="left"):
        fused_kron_apply(g, ("dense",), None)
    with pytest.raises(ValueError, match=r"`right` \(diag\) must have shape \(3, 7\)"):
        fused_kron_apply(g, dense_l, ("diag", jnp.ones((3, 5))))
    with pytest.raises(ValueError, match=r"`left` \(dense\) must have shape \(3, 5, 5\)"):
        fused_kron_apply(g, ("dense", jnp.ones((3, 5, 6))), None)
    with pytest.raises(ValueError, match=r"`right` \(cached\) has batch \(2,\).*mismatch"):
        fused_kron_apply(g, None, ("cached", jnp.ones((2, 7, 7))))
    with pytest.raises(ValueError, match="`g` must be"):
        fused_kron_apply(jnp.ones((2, 3, 5, 7)), None, diag_r)
    with pytest.raises(ValueError, match="`g` must be float32 or bfloat16"):
        fused_kron_apply(g.astype(jnp.float16), dense_l, None)
    with pytest.raises(ValueError, match="`right` must be float32 or bfloat16"):
        fused_kron_apply(g, None, ("diag", jnp.ones((3, 7), jnp.float16)))
    with pytest.raises(_SHAPE_ERRORS, match="diag_is_p"):
        fused_kron_apply(g, dense_l, None, diag_is_p="yes")
    with pytest.raises(ValueError, match="`left` kind"):
        fused_kron_apply_reference(g, ("Dense", jnp.ones((3, 5, 5))), None)
    with pytest.raises(ValueError, match="`m` must be a positive int"):
        fused_apply_fits(0, 8, "dense", None, "gpu", jnp.float32)
    with pytest.raises(ValueError, match="`right_kind` must be one of"):
        fused_apply_fits(8, 8, "dense", "full", "gpu", jnp.float32)
    with pytest.raises(ValueError, match="`backend`"):
        fused_apply_fits(8, 8, "dense", None, "cuda", jnp.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        fused_apply_fits(8, 8, "dense", None, "gpu", jnp.float16)


def test_fits():
    f32 = jnp.float32
    # the module docstring's table
    assert fused_apply_fits(64, 64, "dense", "dense", "gpu", f32)
    assert fused_apply_fits(32, 128, "cached", "dense", "gpu", f32)
    assert not fused_apply_fits(128, 128, "dense", "dense", "gpu", f32)
    assert fused_apply_fits(128, 10**6, "dense", "diag", "gpu", f32)
    assert not fused_apply_fits(256, 8, "dense", None, "gpu", f32)
    assert fused_apply_fits(768, 768, "dense", "dense", "tpu", f32)
    assert fused_apply_fits(512, 1024, "dense", "cached", "tpu", jnp.bfloat16)
    assert not fused_apply_fits(1024, 1024, "dense", "dense", "tpu", f32)
    assert fused_apply_fits(10**6, 1536, None, "cached", "tpu", f32)
    assert not fused_apply_fits(2048, 16, "dense", None, "tpu", f32)
    for backend in ("gpu", "tpu"):
        assert fused_apply_fits(10**6, 10**6, "diag", "diag", backend, f32)
        assert fused_apply_fits(10**6, 10**5, None, "diag", backend, f32)
        # monotone in the size of a dense side
        fit = [fused_apply_fits(d, 300, "dense", "diag", backend, f32)
               for d in range(16, 1600, 48)]
        assert fit == sorted(fit, reverse=True) and fit[0] and not fit[-1]
    # the estimate itself, by hand: TPU 512×512 dense/dense f32, double-buffered G, output
    # and both factors (4 × 1 MiB) plus two f32 intermediates (no P formed: 512 ≮ 512)
    plan = F._plan(512, 512, "dense", "dense", "tpu", 4, F._BUDGETS["tpu"])
    assert (plan.tm, plan.tn, plan.form_left, plan.form_right) == (512, 512, False, False)
    assert plan.working_set == 2 * 4 * 2**20 + 2 * 2**20


@_CPU_ONLY
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_jvp_and_grad_match_reference(rng, backend):
    kinds = ("dense", "diag")
    g, ls, rs = _inputs(rng, 40, 130, 3, kinds)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
                     for x in (g, ls[1], rs[1]))

    def make(fn):
        return lambda g, a, b: fn(g, (kinds[0], a), (kinds[1], b), precision=_HI)

    kern = make(ft.partial(fused_kron_apply, backend=backend, interpret=_MODES[backend]))
    ref = make(fused_kron_apply_reference)
    primals = (g, ls[1], rs[1])
    out_k, tan_k = jax.jvp(kern, primals, tangents)
    out_r, tan_r = jax.jvp(ref, primals, tangents)
    assert _rel_err(out_k, out_r) < 1e-5
    assert _rel_err(tan_k, tan_r) < 1e-5
    assert _rel_err(tan_k, jnp.zeros_like(tan_k) + 1.0) > 1e-2  # a real tangent

    def loss(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))

    for a, b in zip(loss(kern)(*primals), loss(ref)(*primals)):
        assert _rel_err(a, b) < 1e-5


@_CPU_ONLY
def test_vmap(rng):
    # an extra stack axis over a batched call
    kinds = ("cached", "dense")
    g, ls, rs = _inputs(rng, 5, 7, 6, kinds)
    ref = fused_kron_apply_reference(g, ls, rs, precision=_HI)

    def fn(g, a, b):
        return fused_kron_apply(g, (kinds[0], a), (kinds[1], b), interpret=True,
                                precision=_HI)

    split = [x.reshape(2, 3, *x.shape[1:]) for x in (g, ls[1], rs[1])]
    out = jax.vmap(fn)(*split).reshape(g.shape)
    assert _rel_err(out, ref) < 1e-5
