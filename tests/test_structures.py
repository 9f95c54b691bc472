"""Every preconditioner structure on its own: P·g against the dense matrix, fixed points of
the whitening and Newton fits, jit/vmap, serialisation, non-finite inputs, validation.

Each fit is one jitted `lax.scan`, so a test costs one compilation plus a few thousand tiny
steps. Targets are matrices the structure can represent exactly: for a symmetric positive
definite S, whitening samples h ~ N(0, S²) (P → (S²)^(−1/2) = S⁻¹) and Newton fits pairs
(v, S·v) (P → S⁻¹), so both fits share one target S⁻¹.
"""

import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx as pe
from psgd_eqx import AffineQ, DenseQ, DiagQ, KronQ, LRAQ, XMatQ

from .helpers import spd, tree_finite


# -- helpers ---------------------------------------------------------------------------


def _rel(p, target) -> float:
    return float(jnp.linalg.norm(p - target) / jnp.linalg.norm(target))


def _shape(q) -> tuple[int, ...]:
    return q.d.shape if isinstance(q, DiagQ) else q.shape


def _size(q) -> int:
    return math.prod(_shape(q))


@eqx.filter_jit
def _whiten_fit(q, s, lr: float, steps: int, key):
    """Fit on h = S·z, z ~ N(0, I) over the flat parameter (v ~ N(0, I) when needed)."""
    shape = _shape(q)

    def body(q, k):
        kz, kv, ku = jax.random.split(k, 3)
        h = (s @ jax.random.normal(kz, (s.shape[0],), s.dtype)).reshape(shape)
        v = jax.random.normal(kv, shape, s.dtype)
        return q.update(v if q.needs_v else None, h, lr=lr, key=ku), None

    return jax.lax.scan(body, q, jax.random.split(key, steps))[0]


@eqx.filter_jit
def _newton_fit(q, hess, lr: float, steps: int, key):
    """Fit on exact pairs (v, H·v) with a fresh v ~ N(0, I) every step."""
    shape = _shape(q)

    def body(q, k):
        kv, ku = jax.random.split(k)
        v = jax.random.normal(kv, shape, hess.dtype)
        h = (hess @ v.reshape(-1)).reshape(shape)
        return q.update(v, h, lr=lr, key=ku), None

    return jax.lax.scan(body, q, jax.random.split(key, steps))[0]


@eqx.filter_jit
def _random_updates(q, key, lr: float = 0.5, steps: int = 4):
    """A few updates on random (v, h) pairs: moves Q far from the identity."""
    shape = _shape(q)
    dtype = jax.tree.leaves(q)[0].dtype

    def body(q, k):
        kv, kh, ku = jax.random.split(k, 3)
        v = jax.random.normal(kv, shape, dtype)
        h = 3.0 * jax.random.normal(kh, shape, dtype)
        return q.update(v, h, lr=lr, key=ku), None

    return jax.lax.scan(body, q, jax.random.split(key, steps))[0]


def _matrix_view_perm(shape, perm, m: int, k: int):
    """Conjugate an operator on the matrix view back to the flat original parameter,
    written independently of `AffineQ.as_matrix`: M = Πᵀ (·) Π with Π the permutation."""
    n = math.prod(shape)
    idx = np.transpose(np.arange(n).reshape(shape), perm).reshape(-1)
    pi = np.zeros((n, n), np.float32)
    pi[np.arange(n), idx] = 1.0  # (Π x)[j] = x[idx[j]]: the matrix view's flat order
    pi = jnp.asarray(pi)
    return lambda op: pi.T @ op @ pi


def _x_spd(key, n: int, cond: float):
    """An X-shaped SPD matrix: element i coupled only with n−1−i (2×2 SPD blocks)."""
    m = n // 2
    k_ev, k_rot = jax.random.split(key)
    ev = np.asarray(jax.random.permutation(k_ev, jnp.logspace(0.0, math.log10(cond), n)))
    th = np.asarray(jax.random.uniform(k_rot, (m,), minval=0.0, maxval=math.pi))
    s = np.zeros((n, n), np.float32)
    for i in range(m):
        j = n - 1 - i
        r = np.array([[np.cos(th[i]), -np.sin(th[i])], [np.sin(th[i]), np.cos(th[i])]])
        b = r @ np.diag(ev[2 * i : 2 * i + 2]) @ r.T
        s[np.ix_([i, j], [i, j])] = b
    if n % 2:
        s[m, m] = ev[-1]
    return jnp.asarray(s)


def _lra_spd(key, n: int, rank: int, spread: float, strength: float):
    """S = D (I + W Wᵀ) D: S⁻¹ = D⁻¹ (I + W Wᵀ)⁻¹ D⁻¹ is exactly an LRA P = QᵀQ with
    Q = (I + U Vᵀ) diag(D⁻¹)."""
    k1, k2 = jax.random.split(key)
    d = jnp.exp(spread * jax.random.uniform(k1, (n,), minval=-1.0, maxval=1.0))
    w = jax.random.normal(k2, (n, rank)) * (strength / n) ** 0.5
    return d[:, None] * (jnp.eye(n) + w @ w.T) * d[None, :]


def _kron_problem(shape, cond: float, seed: int):
    """For AffineQ on `shape`: S = A ⊗ B on the matrix view, as a flat-index operator."""
    perm, (m, k) = pe.matrix_view(shape)
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    a = spd(ka, m, cond) if m > 1 else jnp.ones((1, 1), jnp.float32)
    b = spd(kb, k, cond)
    conj = _matrix_view_perm(shape, perm, m, k)
    return conj(jnp.kron(a, b)), perm


# -- the structures under test ----------------------------------------------------------

# name -> constructor of a small preconditioner (all f32); used by the generic tests below.
_MAKERS = {
    "dense": lambda: DenseQ.init((2, 3)),
    "dense_eq": lambda: DenseQ.init(5, geometry="EQ"),
    "xmat_even": lambda: XMatQ.init(6),
    "xmat_odd": lambda: XMatQ.init((7,), geometry="PRO"),
    "lra_rank0": lambda: LRAQ.init(6, rank=0),
    "lra_rank2": lambda: LRAQ.init((2, 4), rank=2, key=jax.random.PRNGKey(3)),
    "affine_vector": lambda: AffineQ.init((5,)),
    "affine_matrix": lambda: AffineQ.init((3, 4), geometry="EQ"),
    "affine_3d_perm": lambda: AffineQ.init((2, 6, 3)),
    "diag": lambda: DiagQ.init((3, 4)),
    "kron": lambda: KronQ.init((4, 3)),
    "kron_3d_mixed": lambda: KronQ.init((4, 1, 3, 2), dense=(True, False, True)),
}


# -- P·g equals the dense matrix ----------------------------------------------------------


def _check_apply_matches_matrix(q, key, complex_=False):
    shape = _shape(q)
    n = math.prod(shape)
    dtype = jnp.complex64 if complex_ else jnp.float32
    g = jax.random.normal(key, shape, dtype)
    p = q.as_matrix()
    assert p.shape == (n, n)
    got = q.apply(g)
    assert got.shape == g.shape and got.dtype == g.dtype
    want = (p.astype(dtype) @ g.reshape(-1)).reshape(shape)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_apply_equals_as_matrix(name):
    q0 = _MAKERS[name]()
    key = jax.random.PRNGKey(0)
    _check_apply_matches_matrix(q0, key)
    q = _random_updates(q0, jax.random.PRNGKey(1))
    assert tree_finite(q)
    # the updates moved P far from the identity, so the comparison is not vacuous
    assert _rel(q.as_matrix(), q0.as_matrix()) > 0.05
    _check_apply_matches_matrix(q, key)


@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
@pytest.mark.parametrize("cls,shape", [(DenseQ, (2, 3)), (XMatQ, (6,)), (XMatQ, (3, 3))])
def test_apply_equals_as_matrix_every_geometry(cls, shape, geometry):
    q0 = cls.init(shape, geometry=geometry)
    _check_apply_matches_matrix(q0, jax.random.PRNGKey(0))
    q = _random_updates(q0, jax.random.PRNGKey(1))
    assert _rel(q.as_matrix(), q0.as_matrix()) > 0.05
    _check_apply_matches_matrix(q, jax.random.PRNGKey(2))
    p = q.as_matrix()
    # P is Hermitian (stored-P geometries to their Procrustes/symmetrisation tolerance)
    np.testing.assert_allclose(p, p.T, atol=2e-3 * float(jnp.max(jnp.abs(p))))


@pytest.mark.parametrize("geometry", ["PRO", "EQ", "QUAD4P"])
@pytest.mark.parametrize("cls,shape", [(DenseQ, (5,)), (KronQ, (4, 3))])
def test_apply_equals_as_matrix_complex64(cls, shape, geometry):
    q0 = cls.init(shape, jnp.complex64, geometry=geometry)
    assert q0.as_matrix().dtype == jnp.complex64
    _check_apply_matches_matrix(q0, jax.random.PRNGKey(0), complex_=True)
    q = _random_updates(q0, jax.random.PRNGKey(1))
    assert tree_finite(q) and _rel(q.as_matrix(), q0.as_matrix()) > 0.05
    # P stays Hermitian (not merely symmetric) for complex factors
    p = q.as_matrix()
    np.testing.assert_allclose(p, jnp.conj(p.T), atol=2e-3 * float(jnp.max(jnp.abs(p))))
    _check_apply_matches_matrix(q, jax.random.PRNGKey(2), complex_=True)


def test_apply_keeps_gradient_dtype():
    for q in (DenseQ.init(4), XMatQ.init(5), LRAQ.init(4, rank=1), AffineQ.init((2, 2))):
        g = jnp.ones(q.shape, jnp.bfloat16)
        assert q.apply(g).dtype == jnp.bfloat16


def test_affine_as_matrix_permutes_like_matrix_view():
    """(2, 6, 3) is seen as the 6×6 matrix of the transpose (0, 2, 1): P on the original
    flat index is Πᵀ (P_L ⊗ P_R) Π."""
    shape = (2, 6, 3)
    perm, (m, k) = pe.matrix_view(shape)
    assert perm == (0, 2, 1) and (m, k) == (6, 6)
    q = _random_updates(AffineQ.init(shape), jax.random.PRNGKey(4))
    assert q.kron.shape == (6, 6)
    conj = _matrix_view_perm(shape, perm, m, k)
    np.testing.assert_allclose(q.as_matrix(), conj(q.kron.as_matrix()), rtol=1e-5, atol=1e-6)


# -- whitening fixed points: P → Σ^(−1/2) ----------------------------------------------
# (measured errors on the CPU backend are in comments; thresholds leave a margin)


@pytest.mark.parametrize("geometry,threshold", [("PRO", 0.15), ("EQ", 0.15)])
def test_whitening_dense(geometry, threshold):
    s = spd(jax.random.PRNGKey(10), 8, 30.0)
    target = jnp.linalg.inv(s)
    q0 = DenseQ.init(8, geometry=geometry)
    q = _whiten_fit(q0, s, 0.05, 3000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.8, err0
    assert err <= threshold, err


@pytest.mark.slow
@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
def test_whitening_dense_every_geometry(geometry):
    s = spd(jax.random.PRNGKey(1), 16, 10.0)
    target = jnp.linalg.inv(s)
    q = _whiten_fit(DenseQ.init(16, geometry=geometry), s, 0.05, 4000, jax.random.PRNGKey(0))
    err = _rel(q.as_matrix(), target)
    assert err <= 0.15, err


@pytest.mark.parametrize("n", [10, 11])
@pytest.mark.parametrize("geometry", ["EQ", "PRO"])
def test_whitening_xmat(n, geometry):
    s = _x_spd(jax.random.PRNGKey(5), n, 30.0)
    target = jnp.linalg.inv(s)
    q0 = XMatQ.init(n, geometry=geometry)
    q = _whiten_fit(q0, s, 0.05, 3000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.8, err0
    assert err <= 0.15, err
    # the fitted P keeps the X shape
    mask = (jnp.eye(n) + jnp.eye(n)[::-1]) > 0
    assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, q.as_matrix())))) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
def test_whitening_xmat_every_geometry(geometry):
    s = _x_spd(jax.random.PRNGKey(6), 11, 30.0)
    q = _whiten_fit(XMatQ.init(11, geometry=geometry), s, 0.05, 4000, jax.random.PRNGKey(0))
    err = _rel(q.as_matrix(), jnp.linalg.inv(s))
    assert err <= 0.15, err


def test_whitening_lra_rank0_diagonal():
    s = jnp.diag(jnp.logspace(0.0, 1.0, 12))
    target = jnp.linalg.inv(s)
    q0 = LRAQ.init(12, rank=0)
    q = _whiten_fit(q0, s, 0.05, 3000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.5, err0
    assert err <= 0.1, err


def test_whitening_lra_low_rank():
    """Σ^(1/2) = D(I + WWᵀ)D with rank(W) = 2: LRAQ rank 2 fits it, rank 0 cannot."""
    s = _lra_spd(jax.random.PRNGKey(7), 12, 2, 0.3, 5.0)
    target = jnp.linalg.inv(s)
    key = jax.random.PRNGKey(0)
    q0 = LRAQ.init(12, rank=2, key=jax.random.PRNGKey(1))
    q = _whiten_fit(q0, s, 0.05, 3000, key)
    diag_only = _whiten_fit(LRAQ.init(12, rank=0), s, 0.05, 3000, key)
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    err_diag = _rel(diag_only.as_matrix(), target)
    assert err0 > 0.4, err0
    assert err <= 0.2, err
    assert err < 0.6 * err_diag, (err, err_diag)


@pytest.mark.parametrize("shape", [(6,), (5, 4), (2, 6, 3)])
def test_whitening_affine(shape):
    s, _ = _kron_problem(shape, 10.0, 3)
    target = jnp.linalg.inv(s)
    q0 = AffineQ.init(shape)
    q = _whiten_fit(q0, s, 0.05, 2000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.7, err0
    assert err <= 0.15, err


def test_whitening_diag():
    var = jnp.logspace(-1.0, 1.0, 12)
    s = jnp.diag(var**0.5)
    q0 = DiagQ.init((3, 4))
    q = _whiten_fit(q0, s, 0.05, 2000, jax.random.PRNGKey(0))
    target = jnp.diag(var**-0.5)
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.5, err0
    assert err <= 0.1, err


# -- Newton fixed points: P → H⁻¹ ---------------------------------------------------------


@pytest.mark.parametrize("geometry", ["PRO", "QUAD", "QEQ", "QUAD4P"])
def test_newton_dense(geometry):
    """A random SPD H with condition number 100, from the default Q = I."""
    h = spd(jax.random.PRNGKey(2), 12, 100.0)
    target = jnp.linalg.inv(h)
    q0 = DenseQ.init(12, geometry=geometry)
    q = _newton_fit(q0, h, 0.1, 600, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 1.0, err0
    assert err <= 0.1, err


@pytest.mark.slow
@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
def test_newton_dense_every_geometry(geometry):
    h = spd(jax.random.PRNGKey(3), 16, 100.0)
    # EQ's triangular group converges slower on this problem (‖Q⁻ᵀv‖² is large): lr 1
    lr = 1.0 if geometry == "EQ" else 0.1
    q = _newton_fit(DenseQ.init(16, geometry=geometry), h, lr, 2000, jax.random.PRNGKey(0))
    err = _rel(q.as_matrix(), jnp.linalg.inv(h))
    assert err <= 0.02, err


@pytest.mark.parametrize("geometry", ["PRO", "QUAD4P"])
def test_newton_kron(geometry):
    """H = H₁ ⊗ H₂, each with condition number 30 (H: 900)."""
    h1, h2 = spd(jax.random.PRNGKey(11), 6, 30.0), spd(jax.random.PRNGKey(12), 4, 30.0)
    h = jnp.kron(h1, h2)
    target = jnp.linalg.inv(h)
    q0 = KronQ.init((6, 4), geometry=geometry)
    q = _newton_fit(q0, h, 0.1, 400, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 1.0, err0
    assert err <= 0.1, err


def test_newton_kron_dense_times_diagonal():
    h1 = spd(jax.random.PRNGKey(13), 5, 30.0)
    h2 = jnp.linspace(1.0, 10.0, 4)
    h = jnp.kron(h1, jnp.diag(h2))
    q0 = KronQ.init((5, 4), dense=(True, False))
    q = _newton_fit(q0, h, 0.1, 400, jax.random.PRNGKey(0))
    err = _rel(q.as_matrix(), jnp.linalg.inv(h))
    assert err <= 0.1, err


@pytest.mark.parametrize("geometry", ["PRO", "QUAD", "PRO4P"])
def test_newton_diag(geometry):
    """Diagonal H with entries spread over 1..100."""
    hd = jnp.logspace(0.0, 2.0, 12)
    q0 = DiagQ.init((3, 4), geometry=geometry)
    q = _newton_fit(q0, jnp.diag(hd), 0.1, 500, jax.random.PRNGKey(0))
    target = jnp.diag(1.0 / hd)
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 1.0, err0
    assert err <= 0.1, err


@pytest.mark.parametrize("n", [10, 11])
@pytest.mark.parametrize("geometry,threshold", [("EQ", 0.05), ("PRO", 1e-3)])
def test_newton_xmat(n, geometry, threshold):
    h = _x_spd(jax.random.PRNGKey(5), n, 30.0)
    target = jnp.linalg.inv(h)
    q0 = XMatQ.init(n, geometry=geometry)
    q = _newton_fit(q0, h, 0.1, 1000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 1.0, err0
    assert err <= threshold, err


@pytest.mark.parametrize("rank", [0, 2])
def test_newton_lra(rank):
    """H = D(I + WWᵀ)D, rank(W) = 2: rank 2 fits H⁻¹ closely, rank 0 only its diagonal."""
    h = _lra_spd(jax.random.PRNGKey(7), 12, 2, 0.3, 5.0)
    target = jnp.linalg.inv(h)
    q0 = LRAQ.init(12, rank=rank, key=jax.random.PRNGKey(1))
    q = _newton_fit(q0, h, 0.3, 2000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 0.4, err0
    if rank:
        assert err <= 0.05, err
    else:
        assert err >= 0.3, err  # the low-rank part of H⁻¹ is out of reach of a diagonal


def test_newton_lra_rank0_diagonal():
    hd = jnp.logspace(0.0, 1.0, 9)
    q = _newton_fit(LRAQ.init(9, rank=0), jnp.diag(hd), 0.3, 1000, jax.random.PRNGKey(0))
    err = _rel(q.as_matrix(), jnp.diag(1.0 / hd))
    assert err <= 1e-3, err


@pytest.mark.parametrize("shape", [(6,), (5, 4), (2, 6, 3)])
@pytest.mark.parametrize("geometry,threshold", [("PRO", 1e-3), ("EQ", 0.05)])
def test_newton_affine(shape, geometry, threshold):
    h, _ = _kron_problem(shape, 10.0, 3)
    target = jnp.linalg.inv(h)
    q0 = AffineQ.init(shape, geometry=geometry)
    q = _newton_fit(q0, h, 0.1, 1000, jax.random.PRNGKey(0))
    err, err0 = _rel(q.as_matrix(), target), _rel(q0.as_matrix(), target)
    assert err0 > 1.0, err0
    assert err <= threshold, err


# -- jit, vmap, serialisation ------------------------------------------------------------


def _step(q, v, h, g, key):
    q = q.update(v, h, lr=0.3, key=key)
    return q, q.apply(g)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_jit_and_vmap(name):
    make = _MAKERS[name]
    shape = _shape(make())
    b = 3
    qs = jax.vmap(lambda _: make())(jnp.arange(b))
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(8), 4)
    scale = jnp.array([1.0, 10.0, 0.1], jnp.float32).reshape((b,) + (1,) * len(shape))
    vs = jax.random.normal(k1, (2, b) + shape)
    hs = jax.random.normal(k2, (2, b) + shape) * scale[None]
    gs = jax.random.normal(k3, (2, b) + shape)
    keys = jax.random.split(k4, 2 * b).reshape(2, b, -1)

    batched = jax.jit(jax.vmap(_step))
    single = jax.jit(_step)
    singles = [_index(qs, i) for i in range(b)]
    # jit agrees with eager on the first element
    eager_q, eager_out = _step(singles[0], vs[0, 0], hs[0, 0], gs[0, 0], keys[0, 0])
    jit_q, jit_out = single(singles[0], vs[0, 0], hs[0, 0], gs[0, 0], keys[0, 0])
    assert eqx.tree_equal(eager_q, jit_q, rtol=1e-5, atol=1e-6)
    assert eqx.tree_equal(eager_out, jit_out, rtol=1e-5, atol=1e-6)
    for t in range(2):  # the second round starts from distinct preconditioners
        qs, out = batched(qs, vs[t], hs[t], gs[t], keys[t])
        assert jax.tree.structure(qs) == jax.tree.structure(jax.vmap(lambda _: make())(
            jnp.arange(b)))
        for i in range(b):
            singles[i], out_i = single(singles[i], vs[t, i], hs[t, i], gs[t, i], keys[t, i])
            assert eqx.tree_equal(_index(qs, i), singles[i], rtol=1e-4, atol=1e-6)
            assert eqx.tree_equal(out[i], out_i, rtol=1e-4, atol=1e-5)
    # fitted to differently scaled data, the preconditioners differ
    assert _rel(_index(qs, 1).as_matrix(), _index(qs, 0).as_matrix()) > 0.1


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_serialise_round_trip(name, tmp_path):
    make = _MAKERS[name]
    q = _random_updates(make(), jax.random.PRNGKey(9))
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, q)
    buf.seek(0)
    back = eqx.tree_deserialise_leaves(buf, make())
    assert eqx.tree_equal(back, q)
    assert not eqx.tree_equal(make(), q)  # the round trip restored the fitted state
    path = tmp_path / f"{name}.eqx"
    eqx.tree_serialise_leaves(path, q)
    assert eqx.tree_equal(eqx.tree_deserialise_leaves(path, make()), q)
    g = jnp.ones(_shape(q), jnp.float32)
    assert eqx.tree_equal(back.apply(g), q.apply(g))


@eqx.filter_jit
def _one_update(q, v, h, key):
    return q.update(v, h, lr=0.3, key=key)


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_non_finite_inputs_leave_state_unchanged(name):
    q = _random_updates(_MAKERS[name](), jax.random.PRNGKey(10), steps=2)
    shape = _shape(q)
    n = math.prod(shape)
    kv, kh, ku = jax.random.split(jax.random.PRNGKey(11), 3)
    v = jax.random.normal(kv, shape)
    h = jax.random.normal(kh, shape)
    # sanity: a finite pair does move Q
    assert not eqx.tree_equal(_one_update(q, v, h, ku), q)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for pos in sorted({0, n // 2, n - 1}):
            bad_h = h.reshape(-1).at[pos].set(bad).reshape(shape)
            bad_v = v.reshape(-1).at[pos].set(bad).reshape(shape)
            for vv, hh in ((v, bad_h), (bad_v, h)):
                new = _one_update(q, vv, hh, ku)
                assert eqx.tree_equal(new, q), (bad, pos)
                assert tree_finite(new)
            if not q.needs_v:  # whitening without v
                new = _one_update(q, None, bad_h, ku)
                assert eqx.tree_equal(new, q), (bad, pos)


@pytest.mark.parametrize("name", sorted(_MAKERS))
def test_rescale_scales_p_by_square(name):
    q = _random_updates(_MAKERS[name](), jax.random.PRNGKey(12))
    np.testing.assert_allclose(q.rescale(3.0).as_matrix(), 9.0 * q.as_matrix(), rtol=1e-4,
                               atol=1e-6 * float(jnp.max(jnp.abs(q.as_matrix()))))


def test_init_scale_and_state_bytes():
    for geometry in pe.GEOMETRIES:
        for q in (DenseQ.init(4, geometry=geometry, init_scale=2.0),
                  XMatQ.init(5, geometry=geometry, init_scale=2.0),
                  DiagQ.init((2, 3), geometry=geometry, init_scale=2.0),
                  KronQ.init((3, 2), geometry=geometry, init_scale=2.0),
                  AffineQ.init((3, 2), geometry=geometry, init_scale=2.0)):
            n = _size(q)
            np.testing.assert_allclose(q.as_matrix(), 4.0 * jnp.eye(n), rtol=1e-6)
    np.testing.assert_allclose(LRAQ.init(5, rank=2, init_scale=2.0).as_matrix(),
                               4.0 * jnp.eye(5), rtol=1e-6)
    assert DenseQ.init(10).state_bytes == 10 * 10 * 4 + 4
    assert XMatQ.init(10).state_bytes == 5 * 4 * 4 + 4
    assert LRAQ.init(10, rank=3).state_bytes == (2 * 10 * 3 + 10 + 3) * 4


# -- validation ---------------------------------------------------------------------------


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


def test_lra_validation():
    for rank in (-1, 6, 10, 2.0, True):
        with _raises("rank"):
            LRAQ.init(6, rank=rank)
    with _raises("dtype"):
        LRAQ.init(6, jnp.complex64, rank=1)
    LRAQ.init(6, rank=5)  # the largest allowed rank
    q = LRAQ.init(6, rank=2)
    with _raises("n, r"):
        LRAQ(q.u, q.v[:, :1], q.d, q.lipschitz, q.shape)
    with _raises("n, r"):
        LRAQ(q.u, q.v, q.d[:5], q.lipschitz, q.shape)
    with _raises("lipschitz"):
        LRAQ(q.u, q.v, q.d, q.lipschitz[:2], q.shape)
    with _raises("needs the probe"):
        q.update(None, jnp.ones(6), lr=0.1, key=jax.random.PRNGKey(0))


def test_dense_validation():
    q = DenseQ.init((2, 3))
    with _raises(r"DenseQ\(q=...\)"):
        DenseQ(jnp.eye(5), q.lipschitz, (2, 3), "PRO")
    with _raises("geometry"):
        DenseQ(q.q, q.lipschitz, (2, 3), "XYZ")
    with _raises("geometry"):
        DenseQ.init(4, geometry="EQ2")
    with _raises("non-empty"):
        DenseQ.init((0,))
    with _raises("DenseQ.apply"):
        q.apply(jnp.ones((3, 2)))
    with _raises("DenseQ.update"):
        q.update(None, jnp.ones((6,)), lr=0.1, key=jax.random.PRNGKey(0))
    with _raises("needs the probe"):
        DenseQ.init(3, geometry="EQ").update(None, jnp.ones(3), lr=0.1,
                                             key=jax.random.PRNGKey(0))


def test_xmat_validation():
    q = XMatQ.init(7)
    with _raises("blocks"):
        XMatQ(q.blocks[:2], q.lipschitz, q.middle, (7,), "EQ")
    with _raises("middle"):
        XMatQ(q.blocks, q.lipschitz, None, (7,), "EQ")
    even = XMatQ.init(6)
    with _raises("middle"):
        XMatQ(even.blocks, even.lipschitz, q.middle, (6,), "EQ")
    with _raises("geometry"):
        XMatQ.init(6, geometry="nope")
    with _raises("non-empty"):
        XMatQ.init(0)
    with _raises("XMatQ.apply"):
        q.apply(jnp.ones(6))
    with _raises("needs the probe"):
        q.update(None, jnp.ones(7), lr=0.1, key=jax.random.PRNGKey(0))


def test_affine_kron_diag_validation():
    q = AffineQ.init((2, 6, 3))
    with _raises("perm"):
        AffineQ(q.kron, q.shape, (0, 1, 1))
    with _raises("kron"):
        AffineQ(KronQ.init((2, 3, 4)), (2, 3, 4), (0, 1, 2))
    with _raises("AffineQ.apply"):
        q.apply(jnp.ones((2, 3, 6)))
    with _raises("geometry"):
        AffineQ.init((3, 4), geometry="bad")
    k = KronQ.init((4, 3))
    with _raises("factors"):
        KronQ((k.factors[0], jnp.eye(4)), k.lipschitz, None, (4, 3), (True, True), "PRO")
    with _raises("factor"):
        KronQ(k.factors[:1], k.lipschitz, None, (4, 3), (True, True), "PRO")
    with _raises("lipschitz"):
        KronQ(k.factors, k.lipschitz[:1], None, (4, 3), (True, True), "PRO")
    with _raises("dense"):
        KronQ.init((4, 3), dense=(True,))
    with _raises("KronQ.apply"):
        k.apply(jnp.ones((3, 4)))
    d = DiagQ.init((3,))
    with _raises("lipschitz"):
        DiagQ(d.d, jnp.zeros(2), "PRO")
    with _raises("geometry"):
        DiagQ(d.d, d.lipschitz, "bad")
    with _raises("DiagQ.apply"):
        d.apply(jnp.ones(4))
