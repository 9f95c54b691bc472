"""`fused_factor_refit`: one Pallas launch for the refit of a stack of dense factors.

The reference is checked against `psgd_eqx._geometry.fit_factor` (the starts derived from
the key as `fit_factor` derives them), the kernel against the reference in both interpreted
modes (`interpret=True` for the GPU (Triton) variant, `pltpu.InterpretParams()` for the TPU
(Mosaic) variant), at unaligned n so that the padding is exercised.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from psgd_eqx_kernels._fused_refit import (
    fused_factor_refit,
    fused_factor_refit_reference,
    fused_refit_fits,
)


_HI = jax.lax.Precision.HIGHEST
_CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu",
                               reason="interpreted kernels run on CPU")
_MODES = {"gpu": ("gpu", True), "tpu": ("tpu", pltpu.InterpretParams())}


def _rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


@pytest.fixture
def rng(request):
    # numpy draws: eager jax.random costs seconds of first-call compilations on CPU
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


def _inputs(rng, n, batch, *, m=None, t2_matrix=False, k=4, dtype=jnp.float32):
    """A stack of near-identity factors with SPD statistics, as the refit sees them."""
    q = np.eye(n) + rng.standard_normal((batch, n, n)) / (4 * n)
    mm = n if m is None else m
    y = rng.standard_normal((batch, n, mm)) / np.sqrt(mm)
    if t2_matrix:
        b = rng.standard_normal((batch, n, n)) / np.sqrt(n)
        t2 = b @ np.swapaxes(b, -1, -2)
    else:
        t2 = rng.uniform(0.5, 1.5, (batch,))
    args = dict(
        q=_f32(q).astype(dtype), t2=_f32(t2),
        old_l=_f32(rng.uniform(0.5, 3.0, (batch,))),
        lr=_f32(rng.uniform(0.05, 0.3, (batch,))),
        start_ell=_f32(rng.standard_normal((batch, k, n))),
        start_r=_f32(rng.standard_normal((batch, k, n))),
    )
    if m is None:
        args["t1"] = _f32(y @ np.swapaxes(y, -1, -2))
    else:
        args["y"] = _f32(y)
    return args


# -- the reference is psgd_eqx's refit --------------------------------------------------------


# beta and the bound act in the normaliser, before the geometry step: the default run pairs
# them as (0.9, subspace) and (0.0, one_step); the crossed pairs run with -m slow.
_NORMALISERS = [
    (0.9, "subspace"), (0.0, "one_step"),
    pytest.param(0.0, "subspace", marks=pytest.mark.slow),
    pytest.param(0.9, "one_step", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("beta,bound", _NORMALISERS)
@pytest.mark.parametrize("t2_matrix", [False, True], ids=["t2-scalar", "t2-matrix"])
@pytest.mark.parametrize("geometry", ["PRO", "EQ", "QUAD"])
def test_reference_is_fit_factor(rng, geometry, t2_matrix, beta, bound):
    from psgd_eqx import _rng
    from psgd_eqx._geometry import fit_factor
    from psgd_eqx._norms import Normaliser

    n, batch, nk = 12, 3, 5
    args = _inputs(rng, n, batch, t2_matrix=t2_matrix)
    keys = jnp.asarray(rng.integers(0, 2**32, (batch, 2), dtype=np.uint32))
    normaliser = Normaliser(beta=beta, bound=bound, k=nk, half_iters=2)
    k = min(nk, n)

    def starts(key):  # what fit_factor draws from its key
        k_ell, k_step = _rng.split(key)
        return _rng.normal(k_ell, (k, n)), _rng.normal(k_step, (k, n))

    start_ell, start_r = jax.jit(jax.vmap(starts))(keys)
    # a shared lr: fit_factor takes it as one μ, as the optimizer passes it
    lr = args["lr"][0]

    def geo(q, t1, t2, old_l, key):
        return fit_factor(geometry, q, t1, t2, old_l, lr, key, normaliser, dense=True)

    # op by op: the ops' compilations are shared by the 24 cases (jitting both sides
    # would compile each case anew)
    with jax.disable_jit(), jax.default_matmul_precision("highest"):
        q_geo, l_geo = jax.vmap(geo)(args["q"], args["t1"], args["t2"], args["old_l"], keys)
        q_ref, l_ref = fused_factor_refit_reference(
            args["q"], args["t2"], args["old_l"], lr, t1=args["t1"], start_ell=start_ell,
            start_r=start_r, geometry=geometry, beta=beta, bound=bound, half_iters=2,
            precision=_HI)
    assert l_ref.shape == (batch,) and l_ref.dtype == jnp.float32
    assert _rel_err(l_ref, l_geo) < 1e-5
    assert _rel_err(q_ref, q_geo) < 1e-5
    # the step moved the factors (so equal outputs are not both just q)
    assert _rel_err(q_ref, args["q"]) > 1e-4


# -- the kernel against the reference ----------------------------------------------------------

# (mode, n, batch, m (None: the t1 form), geometry, t2 matrix, bound, beta): every geometry
# on both backends, both statistic forms, both T₂ kinds and both bounds, n unaligned on both
# backends (5, 40, 130), single factors and stacks. The tests further down reuse the shapes
# and configurations of the first two (and of the fifth) so that their compilations are
# shared (interpreted kernels take seconds each to compile on CPU).
_CASES = [
    ("gpu", 5, 1, None, "PRO", False, "subspace", 0.9),
    ("tpu", 5, 3, 9, "EQ", True, "subspace", 0.0),
    ("gpu", 40, 3, 24, "QUAD", False, "one_step", 0.9),
    ("tpu", 40, 1, None, "PRO", True, "one_step", 0.0),
    ("gpu", 40, 3, 24, "EQ", False, "subspace", 0.9),
    ("tpu", 40, 3, None, "QUAD", True, "subspace", 0.9),
    ("tpu", 130, 3, 70, "PRO", False, "subspace", 0.9),
    ("gpu", 130, 1, 200, "QUAD", True, "subspace", 0.0),
    ("gpu", 130, 1, None, "PRO", True, "subspace", 0.9),
]


def _call_both(args, mode, **kw):
    backend, interpret = _MODES[mode]
    out = fused_factor_refit(**args, backend=backend, interpret=interpret, precision=_HI, **kw)
    ref = fused_factor_refit_reference(**args, precision=_HI, **kw)
    return out, ref


@_CPU_ONLY
@pytest.mark.parametrize("case", _CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference(rng, case):
    mode, n, batch, m, geometry, t2_matrix, bound, beta = case
    args = _inputs(rng, n, batch, m=m, t2_matrix=t2_matrix, k=min(7, n))
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, mode, geometry=geometry, bound=bound,
                                                beta=beta)
    assert q_out.shape == (batch, n, n) and q_out.dtype == jnp.float32
    assert l_out.shape == (batch,) and l_out.dtype == jnp.float32
    assert _rel_err(l_out, l_ref) < 1e-5
    assert _rel_err(q_out, q_ref) < 1e-5
    assert _rel_err(q_out, args["q"]) > 1e-4


@_CPU_ONLY
def test_unbatched_factor(rng):
    args = {k: v[0] for k, v in _inputs(rng, 5, 1, k=5).items()}
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, "gpu", geometry="PRO")
    assert q_out.shape == (5, 5) and l_out.shape == ()
    assert _rel_err(l_out, l_ref) < 1e-5 and _rel_err(q_out, q_ref) < 1e-5


@_CPU_ONLY
@pytest.mark.parametrize("mode,n", [("tpu", 130)])
def test_bf16_storage(rng, mode, n):
    # bf16 q and y: the kernel computes in f32, so it matches the f32 reference on the same
    # (bf16-valued) inputs to bf16 rounding of the output, and L (which does not depend on
    # q) to f32 accuracy.
    args = _inputs(rng, n, 3, m=n // 2 + 1, dtype=jnp.bfloat16)
    args["y"] = args["y"].astype(jnp.bfloat16)
    f32_args = {k: v.astype(jnp.float32) for k, v in args.items()}
    backend, interpret = _MODES[mode]
    q_out, l_out = fused_factor_refit(**args, backend=backend, interpret=interpret,
                                      precision=_HI)
    q_ref, l_ref = fused_factor_refit_reference(**f32_args, precision=_HI)
    assert q_out.dtype == jnp.bfloat16 and l_out.dtype == jnp.float32
    assert _rel_err(l_out, l_ref) < 1e-5
    assert _rel_err(q_out, q_ref) < 1e-2
    # bf16 storage is not f32: the output really was rounded
    assert _rel_err(q_out, q_ref) > 1e-6


@_CPU_ONLY
def test_init_case_has_no_rotation(rng):
    # Q = s·I and a symmetric T: Q₁ = s(I − η(T − cI)) is symmetric, so R = 0 (every row
    # norm of R equal, its bound 0) and the Procrustes step must leave Q₁ unchanged.
    mode, n, batch, s = "gpu", 5, 1, 0.7
    args = _inputs(rng, n, batch, k=5)
    t1 = args["t1"]
    args["t1"] = 0.5 * (t1 + jnp.swapaxes(t1, -1, -2))  # exactly symmetric
    args["q"] = s * jnp.broadcast_to(jnp.eye(n), (batch, n, n))
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, mode, geometry="PRO")
    assert _rel_err(l_out, l_ref) < 1e-5 and _rel_err(q_out, q_ref) < 1e-5
    eta = (args["lr"] / l_out)[:, None, None]
    c = args["t2"][:, None, None]
    q1 = s * jnp.eye(n)[None] - eta * s * (args["t1"] - c * jnp.eye(n)[None])
    assert _rel_err(q_out, q1) < 1e-6


def _np_subspace_bound(a, start, j, half_iters):
    """The subspace bound with the aligned row j chosen by hand (float64 numpy)."""
    a = np.asarray(a, np.float64)
    scale = np.abs(a).max()
    a = a / scale
    v = a[j][None] + np.sign(np.asarray(start, np.float64) @ a[j])[:, None] * start
    for _ in range(half_iters):
        v = v @ a
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        v = v @ a
    return scale * np.linalg.norm(v, axis=1).max()


@_CPU_ONLY
def test_tied_row_norms_pick_the_first_row():
    mode = "tpu"
    # A circulant T with small-integer rows: every row norm is exactly equal, so the
    # aligned row is argmax's first row; another row would give another ℓ.
    n, k = 6, 2
    row = np.array([4.0, -1.0, 0.0, 2.0, 0.0, -1.0])
    t1 = np.stack([np.roll(row, i) for i in range(n)])[None]
    start = np.array([[1.0, 0.5, -2.0, 0.25, 1.5, -0.75], [-0.5, 1.0, 0.5, -1.0, 0.0, 2.0]])
    args = dict(q=jnp.eye(n)[None], t2=jnp.zeros((1,)), old_l=jnp.zeros((1,)),
                lr=jnp.full((1,), 0.1), t1=jnp.asarray(t1, jnp.float32),
                start_ell=jnp.asarray(start, jnp.float32)[None],
                start_r=jnp.asarray(start, jnp.float32)[None])
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, mode, geometry="EQ", beta=0.0,
                                                half_iters=1)
    first = _np_subspace_bound(t1[0], start[:k], 0, 1)
    assert abs(float(l_ref[0]) - first) < 1e-5 * first
    assert abs(float(l_out[0]) - first) < 1e-5 * first
    others = [_np_subspace_bound(t1[0], start[:k], j, 1) for j in range(1, n)]
    assert min(abs(o - first) for o in others) > 1e-3 * first
    assert _rel_err(q_out, q_ref) < 1e-5


@_CPU_ONLY
def test_zero_statistic(rng):
    # T₁ = 0, T₂ = c·I: ℓ = c and EQ's step is Q + η c Q (the fifth case's shapes)
    args = _inputs(rng, 40, 3, m=24, k=7)
    args["y"] = jnp.zeros_like(args["y"])
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, "gpu", geometry="EQ", beta=0.9)
    c, old, q = args["t2"], args["old_l"], args["q"]
    l_expect = jnp.maximum(0.9 * old + 0.1 * c, c)
    assert _rel_err(l_out, l_expect) < 1e-6 and _rel_err(l_ref, l_expect) < 1e-6
    eta = (args["lr"] / l_expect)[:, None, None]
    expect = q * (1.0 + eta * c[:, None, None])
    assert _rel_err(q_out, expect) < 1e-6 and _rel_err(q_ref, expect) < 1e-6
    assert _rel_err(expect, q) > 1e-4


@_CPU_ONLY
def test_all_zero_statistics(rng):
    # T₁ = T₂ = 0 with β = 0: L = 0, and η = μ/tiny is huge but multiplies E = 0 exactly
    # (the second case's shapes)
    args = _inputs(rng, 5, 3, m=9, t2_matrix=True, k=5)
    args["y"] = jnp.zeros_like(args["y"])
    args["t2"] = jnp.zeros_like(args["t2"])
    (q_out, l_out), (q_ref, l_ref) = _call_both(args, "tpu", geometry="EQ", beta=0.0)
    assert bool(jnp.all(l_out == 0.0)) and bool(jnp.all(l_ref == 0.0))
    assert bool(jnp.all(q_out == args["q"])) and bool(jnp.all(q_ref == args["q"]))


# -- derivatives and batching ------------------------------------------------------------------


@_CPU_ONLY
def test_jvp_is_the_references(rng):
    # the shapes and configuration of the first kernel case (its compilation is reused)
    args = _inputs(rng, 5, 1, k=5)
    diff = ("q", "t1", "t2", "old_l", "lr")
    tangents = {name: _f32(rng.standard_normal(args[name].shape)) for name in diff}
    kw = dict(geometry="PRO", bound="subspace", beta=0.9, precision=_HI)

    def run(fn):
        def f(*xs):
            return fn(**dict(args, **dict(zip(diff, xs))), **kw)
        return jax.jvp(f, tuple(args[d] for d in diff), tuple(tangents[d] for d in diff))

    (q_out, l_out), (dq_out, dl_out) = run(
        lambda **a: fused_factor_refit(**a, interpret=True))
    (q_ref, l_ref), (dq_ref, dl_ref) = run(fused_factor_refit_reference)
    assert _rel_err(q_out, q_ref) < 1e-5
    assert _rel_err(dq_out, dq_ref) < 1e-5 and _rel_err(dl_out, dl_ref) < 1e-5
    assert float(jnp.linalg.norm(dq_out)) > 0 and float(jnp.linalg.norm(dl_out)) > 0
    # a finite difference of the reference: the tangent is a real derivative
    eps = 1e-3
    shifted = {d: args[d] + eps * tangents[d] for d in diff}
    q_eps, _ = fused_factor_refit_reference(**dict(args, **shifted), **kw)
    assert _rel_err((q_eps - q_ref) / eps, dq_ref) < 2e-2


@_CPU_ONLY
def test_vmap_over_an_extra_axis(rng):
    # The shapes and configuration of the second kernel case once the vmapped axis is
    # folded into the stack (3 × 1 factors), so its compilation is reused.
    backend, interpret = _MODES["tpu"]
    args = _inputs(rng, 5, 3, m=9, t2_matrix=True, k=5)
    kw = dict(geometry="EQ", bound="subspace", beta=0.0, precision=_HI)
    outer = {k: v.reshape(3, 1, *v.shape[1:]) for k, v in args.items()}
    # lr shared by the outer axis (unbatched under vmap), per factor inside
    lr = outer.pop("lr")[0]

    def kern(a):
        return fused_factor_refit(**a, lr=lr, backend=backend, interpret=interpret, **kw)

    q_out, l_out = jax.vmap(kern)(outer)
    q_ref, l_ref = fused_factor_refit_reference(**dict(args, lr=jnp.broadcast_to(lr, (3,))),
                                                **kw)
    assert q_out.shape == (3, 1, 5, 5) and l_out.shape == (3, 1)
    assert _rel_err(q_out.reshape(3, 5, 5), q_ref) < 1e-5
    assert _rel_err(l_out.reshape(3), l_ref) < 1e-5


# -- arguments and the working-set estimate ----------------------------------------------------


def _valid():
    n, b = 8, 2
    eye = jnp.broadcast_to(jnp.eye(n), (b, n, n))
    start = jnp.ones((b, 3, n))
    return dict(q=eye, t2=jnp.ones((b,)), old_l=jnp.ones((b,)), lr=0.1, t1=eye,
                start_ell=start, start_r=start)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(geometry="QEQ"), "`geometry` must be one of"),
        (dict(bound="power"), "`bound` must be one of"),
        (dict(beta=1.0), "`beta` must be in"),
        (dict(half_iters=0), "`half_iters` must be >= 1"),
        (dict(backend="cuda"), "`backend`"),
        (dict(y=jnp.ones((2, 8, 3))), "exactly one of `t1` and `y`.*both"),
        (dict(t1=None), "exactly one of `t1` and `y`.*neither"),
        (dict(t1=jnp.ones((2, 8, 9))), "`t1` must have the shape of `q`"),
        (dict(t1=None, y=jnp.ones((2, 7, 3))), "`y` must have shape"),
        (dict(q=jnp.ones((2, 8, 7))), "`q` must be"),
        (dict(q=jnp.ones((2, 8, 8), jnp.float16)), "`q` must be float32 or bfloat16"),
        (dict(t2=jnp.ones((3,))), "`t2` must have shape"),
        (dict(old_l=jnp.ones((3,))), "`old_l` must be"),
        (dict(lr=jnp.ones((3,))), "`lr` must be"),
        (dict(start_ell=None), "`start_ell` is required"),
        (dict(start_r=None), "`start_r` is required"),
        (dict(start_ell=jnp.ones((2, 3, 9))), "`start_ell` must have shape"),
        (dict(start_r=jnp.ones((2, 0, 8))), "`start_r` needs at least one row"),
    ],
)
def test_argument_validation(change, match):
    args = dict(_valid(), **change)
    with pytest.raises(ValueError, match=match):
        fused_factor_refit(**args, interpret=True)
    if "backend" not in change:
        with pytest.raises(ValueError, match=match):
            fused_factor_refit_reference(**args)


def test_unused_starts_are_not_required():
    # EQ/QUAD never bound R; the one-step bound draws nothing: no error, and the result
    # does not depend on what was passed
    args = dict(_valid(), start_r=None)
    out_none = fused_factor_refit_reference(**args, geometry="EQ")
    out_given = fused_factor_refit_reference(**dict(args, start_r=jnp.zeros((2, 3, 8))),
                                             geometry="EQ")
    assert bool(jnp.all(out_none[0] == out_given[0]))
    q_a, l_a = fused_factor_refit_reference(**dict(args, start_ell=None), bound="one_step")
    q_b, l_b = fused_factor_refit_reference(**args, bound="one_step")
    assert bool(jnp.all(q_a == q_b)) and bool(jnp.all(l_a == l_b))


def test_fits_limits_and_monotonicity():
    f32, bf16 = jnp.float32, jnp.bfloat16
    # the documented limits (k = 32, float32 Q)
    assert fused_refit_fits(640, None, 32, "tpu", f32)
    assert not fused_refit_fits(641, None, 32, "tpu", f32)
    assert fused_refit_fits(640, 640, 32, "tpu", f32)
    assert fused_refit_fits(512, 2048, 32, "tpu", f32)
    assert not fused_refit_fits(513, 4 * 513, 32, "tpu", f32)
    assert fused_refit_fits(64, None, 32, "gpu", f32)
    assert not fused_refit_fits(65, None, 32, "gpu", f32)
    assert fused_refit_fits(64, 64, 32, "gpu", f32)
    assert fused_refit_fits(32, 128, 32, "gpu", f32)
    assert not fused_refit_fits(64, 256, 32, "gpu", f32)
    assert not fused_refit_fits(1024, None, 32, "tpu", f32)
    for backend in ("gpu", "tpu"):
        for m_of in (lambda n: None, lambda n: n, lambda n: 4 * n):
            fits = [fused_refit_fits(n, m_of(n), 32, backend, f32) for n in range(1, 1100, 7)]
            assert fits[0] and not fits[-1]
            # once it stops fitting, it never fits again
            assert fits == sorted(fits, reverse=True)
            # bf16 storage never needs more
            assert all(fused_refit_fits(n, m_of(n), 32, backend, bf16)
                       for n, ok in zip(range(1, 1100, 7), fits) if ok)
    # every n that fits on GPU fits on TPU
    assert all(fused_refit_fits(n, None, 32, "tpu", f32)
               for n in range(1, 200) if fused_refit_fits(n, None, 32, "gpu", f32))
    for bad, match in (((0, None, 32, "gpu", f32), "`n`"), ((8, 0, 32, "gpu", f32), "`m`"),
                       ((8, None, 0, "gpu", f32), "`k`"), ((8, None, 4, "cpu", f32), "backend"),
                       ((8, None, 4, "gpu", jnp.float16), "float32 or bfloat16")):
        with pytest.raises(ValueError, match=match):
            fused_refit_fits(*bad)
