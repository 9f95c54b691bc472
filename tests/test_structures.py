"""Every preconditioner structure on its own: P·g against the dense matrix, fixed points of
the whitening and Newton fits, jit/vmap, serialisation, non-finite inputs, validation.

XLA compilation dominates the runtime on CPU, so the structures are exercised in a few
*shared* jitted programs (one program updates a whole dict of preconditioners, one runs a
whole table of fits as `lax.scan`s) computed once per module and read by the individual,
parametrised tests. Fit targets are matrices the structure represents exactly: for a
symmetric positive definite S, whitening samples h ~ N(0, S²) (P → (S²)^(−1/2) = S⁻¹) and
Newton fits exact pairs (v, S·v) (P → S⁻¹), so both fits share the target S⁻¹.
"""

import functools
import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import psgd_eqx as pe
from psgd_eqx import LRAQ, AffineQ, DenseQ, DiagQ, KronQ, XMatQ
from psgd_eqx._shapes import matrix_view

from .helpers import spd, tree_finite


# -- helpers ---------------------------------------------------------------------------


def _rel(p, target) -> float:
    return float(jnp.linalg.norm(p - target) / jnp.linalg.norm(target))


def _shape(q) -> tuple[int, ...]:
    return q.d.shape if isinstance(q, DiagQ) else q.shape


def _dtype(q):
    return jax.tree.leaves(q)[0].dtype


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _random_pair(key, q, scale: float = 3.0):
    kv, kh = jax.random.split(key)
    v = jax.random.normal(kv, _shape(q), _dtype(q))
    h = scale * jax.random.normal(kh, _shape(q), _dtype(q))
    return v, h


@eqx.filter_jit
def _update_all(qs: dict, vs: dict, hs: dict, key):
    """One update of every preconditioner of the dict (one compiled program for all)."""
    return {n: q.update(vs[n], hs[n], lr=0.5, key=key) for n, q in qs.items()}


def _random_updates(qs: dict, seed: int, steps: int = 4) -> dict:
    key = jax.random.PRNGKey(seed)
    for _ in range(steps):
        key, k_pair, k_up = jax.random.split(key, 3)
        pairs = {n: _random_pair(k_pair, q) for n, q in qs.items()}
        qs = _update_all(qs, {n: p[0] for n, p in pairs.items()},
                         {n: p[1] for n, p in pairs.items()}, k_up)
    return qs


def _fit_scan(q, s, newton: bool, lr: float, steps: int, key):
    """`steps` refits of q: whitening on h = S·z (v ~ N(0, I) only if the geometry needs
    it), or Newton on exact pairs (v, S·v); fresh z, v every step."""
    shape, n = _shape(q), s.shape[0]

    def body(q, k):
        kz, kv, ku = jax.random.split(k, 3)
        v = jax.random.normal(kv, (n,), s.dtype)
        if newton:
            h = s @ v
        else:
            h = s @ jax.random.normal(kz, (n,), s.dtype)
        v = v.reshape(shape) if (newton or q.needs_v) else None
        return q.update(v, h.reshape(shape), lr=lr, key=ku), None

    return jax.lax.scan(body, q, jax.random.split(key, steps))[0]


@eqx.filter_jit
def _fit_many(cases: dict, key):
    """cases: name → (q0, S, newton, lr, steps); all fits in one compiled program."""
    return {n: _fit_scan(q, s, newton, lr, steps, key)
            for n, (q, s, newton, lr, steps) in cases.items()}


def _matrix_view_conj(shape):
    """Conjugate an operator on AffineQ's matrix view back to the flat original parameter,
    written independently of `AffineQ.as_matrix`: M ↦ Πᵀ M Π, Π the flat permutation."""
    perm, _ = matrix_view(shape)
    n = math.prod(shape)
    idx = np.transpose(np.arange(n).reshape(shape), perm).reshape(-1)
    pi = np.zeros((n, n), np.float32)
    pi[np.arange(n), idx] = 1.0  # (Π x)[j] = x[idx[j]]: the matrix view's flat order
    pi = jnp.asarray(pi)
    return lambda op: pi.T @ op @ pi


def _x_spd(seed: int, n: int, cond: float):
    """An X-shaped SPD matrix: element i coupled only with n−1−i (2×2 SPD blocks)."""
    m = n // 2
    k_ev, k_rot = jax.random.split(jax.random.PRNGKey(seed))
    ev = np.asarray(jax.random.permutation(k_ev, jnp.logspace(0.0, math.log10(cond), n)))
    th = np.asarray(jax.random.uniform(k_rot, (m,), minval=0.0, maxval=math.pi))
    s = np.zeros((n, n), np.float32)
    for i in range(m):
        r = np.array([[np.cos(th[i]), -np.sin(th[i])], [np.sin(th[i]), np.cos(th[i])]])
        s[np.ix_([i, n - 1 - i], [i, n - 1 - i])] = r @ np.diag(ev[2 * i : 2 * i + 2]) @ r.T
    if n % 2:
        s[m, m] = ev[-1]
    return jnp.asarray(s)


def _lra_spd(seed: int, n: int, rank: int, spread: float = 0.3, strength: float = 5.0):
    """S = D (I + W Wᵀ) D: S⁻¹ = D⁻¹ (I + W Wᵀ)⁻¹ D⁻¹ is exactly an LRA P = QᵀQ with
    Q = (I + U Vᵀ) diag(D⁻¹) and rank(U) = rank(W)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    d = jnp.exp(spread * jax.random.uniform(k1, (n,), minval=-1.0, maxval=1.0))
    w = jax.random.normal(k2, (n, rank)) * (strength / n) ** 0.5
    return d[:, None] * (jnp.eye(n) + w @ w.T) * d[None, :]


def _affine_spd(shape, cond: float, seed: int):
    """For AffineQ on `shape`: S = A ⊗ B on the matrix view, as a flat-index operator."""
    _, (m, k) = matrix_view(shape)
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    a = spd(ka, m, cond) if m > 1 else jnp.ones((1, 1), jnp.float32)
    return _matrix_view_conj(shape)(jnp.kron(a, spd(kb, k, cond)))


# -- the structures under test ----------------------------------------------------------

# name → constructor of a small preconditioner. `_FAST` runs in the default suite (one
# shared compiled update for all of them); `_SLOW` adds the remaining shapes, geometries
# and dtypes under `-m slow`.
_FAST = {
    "dense": lambda: DenseQ.init((2, 3)),
    "dense_PRO4P": lambda: DenseQ.init((2, 3), geometry="PRO4P"),
    "dense_QUAD4P": lambda: DenseQ.init(5, geometry="QUAD4P"),
    "dense_c64": lambda: DenseQ.init(5, jnp.complex64),
    "xmat_odd": lambda: XMatQ.init((7,)),
    "xmat_even_PRO4P": lambda: XMatQ.init((2, 3), geometry="PRO4P"),
    "xmat_odd_QUAD4P": lambda: XMatQ.init(5, geometry="QUAD4P"),
    "lra_rank2": lambda: LRAQ.init((2, 4), rank=2, key=jax.random.PRNGKey(3)),
    "affine_3d_perm": lambda: AffineQ.init((2, 6, 3)),
    "diag": lambda: DiagQ.init((3, 4)),
    "kron_3d_mixed": lambda: KronQ.init((4, 1, 3, 2), dense=(True, False, True)),
    "kron_c64": lambda: KronQ.init((4, 3), jnp.complex64),
}
_SLOW = {
    **{f"dense6_{g}": functools.partial(DenseQ.init, (2, 3), geometry=g) for g in pe.GEOMETRIES},
    **{f"xmat6_{g}": functools.partial(XMatQ.init, (6,), geometry=g) for g in pe.GEOMETRIES},
    **{f"xmat9_{g}": functools.partial(XMatQ.init, (3, 3), geometry=g) for g in pe.GEOMETRIES},
    **{f"dense4_c64_{g}": functools.partial(DenseQ.init, 4, jnp.complex64, geometry=g)
       for g in pe.GEOMETRIES},
    **{f"kron34_c64_{g}": functools.partial(KronQ.init, (3, 4), jnp.complex64, geometry=g)
       for g in ("EQ", "QEP", "PRO4P", "QUAD4P")},
    "lra_rank0": lambda: LRAQ.init(6, rank=0),
    "lra_rank5": lambda: LRAQ.init(6, rank=5, key=jax.random.PRNGKey(1)),
    "affine_scalar": lambda: AffineQ.init(()),
    "affine_vector": lambda: AffineQ.init((5,)),
    "affine_matrix_EQ": lambda: AffineQ.init((3, 4), geometry="EQ"),
    "affine_3d_perm_QUAD4P": lambda: AffineQ.init((3, 5, 2), geometry="QUAD4P"),
    "affine_4d": lambda: AffineQ.init((2, 1, 3, 2)),
    "diag_QUAD4P": lambda: DiagQ.init((5,), geometry="QUAD4P"),
    "kron_2d": lambda: KronQ.init((4, 3)),
    "kron_cached": lambda: KronQ.init((4, 3), cache_preconditioner=True),
}
assert not set(_FAST) & set(_SLOW)
_PARAMS = [pytest.param(n) for n in _FAST] + [
    pytest.param(n, marks=pytest.mark.slow) for n in _SLOW
]


def _group(name: str) -> dict:
    return _FAST if name in _FAST else _SLOW


@functools.cache
def _inits(group: str) -> dict:
    return {n: m() for n, m in (_FAST if group == "fast" else _SLOW).items()}


@functools.cache
def _fitted(group: str) -> dict:
    """The structures after a few updates on random (v, h) pairs: Q is far from I."""
    return _random_updates(_inits(group), seed=1)


def _case(name: str):
    group = "fast" if name in _FAST else "slow"
    return _inits(group)[name], _fitted(group)[name], group


# -- P·g equals the dense matrix ----------------------------------------------------------


def _check_apply(q, key):
    shape, n = _shape(q), math.prod(_shape(q))
    g = jax.random.normal(key, shape, _dtype(q))
    p = q.as_matrix()
    assert p.shape == (n, n) and p.dtype == _dtype(q)
    got = q.apply(g)
    assert got.shape == g.shape and got.dtype == g.dtype
    want = (p @ g.reshape(-1)).reshape(shape)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale)
    # P is Hermitian (stored-P geometries to their Procrustes/symmetrisation tolerance)
    np.testing.assert_allclose(p, jnp.conj(p.T), atol=2e-3 * float(jnp.max(jnp.abs(p))))


@pytest.mark.parametrize("name", _PARAMS)
def test_apply_equals_as_matrix(name):
    q0, q, _ = _case(name)
    _check_apply(q0, jax.random.PRNGKey(0))
    np.testing.assert_allclose(q0.as_matrix(), jnp.eye(math.prod(_shape(q0))), atol=1e-6)
    assert tree_finite(q)
    # the updates moved P far from the identity, so the comparison is not vacuous
    assert _rel(q.as_matrix(), q0.as_matrix()) > 0.05
    _check_apply(q, jax.random.PRNGKey(2))


def test_apply_keeps_gradient_dtype():
    for q in (DenseQ.init(4), XMatQ.init(5), LRAQ.init(4, rank=1), AffineQ.init((2, 2)),
              DiagQ.init((4,)), KronQ.init((2, 2))):
        g = jnp.ones(_shape(q), jnp.bfloat16)
        assert q.apply(g).dtype == jnp.bfloat16


def test_affine_as_matrix_permutes_like_matrix_view():
    """(2, 6, 3) is seen as the 6×6 matrix of the transpose (0, 2, 1): P on the original
    flat index is Πᵀ (P_L ⊗ P_R) Π."""
    shape = (2, 6, 3)
    assert matrix_view(shape) == ((0, 2, 1), (6, 6))
    q = _fitted("fast")["affine_3d_perm"]
    assert q.kron.shape == (6, 6) and q.perm == (0, 2, 1)
    np.testing.assert_allclose(q.as_matrix(), _matrix_view_conj(shape)(q.kron.as_matrix()),
                               rtol=1e-5, atol=1e-6)


# -- whitening and Newton fixed points --------------------------------------------------
# name → (make q0, S, lr, steps, max error, min error of the initial Q). Errors are the
# relative Frobenius distance of P to S⁻¹; the thresholds are the errors measured on CPU
# (in the comments) with a margin.


def _c(make, s, lr, steps, threshold, init_err):
    return make, s, lr, steps, threshold, init_err


_WHITEN_FAST = {
    # S: random SPD, condition number 30 (Σ: 900); measured 0.107 (initial Q = I: 1.68)
    "dense_PRO": _c(lambda: DenseQ.init(8), lambda: spd(jax.random.PRNGKey(10), 8, 30.0),
                    0.05, 3000, 0.2, 0.8),
    # X-shaped S, condition number 30; measured 0.103 (odd n, EQ) and 0.099 (even n, PRO)
    "xmat_odd_EQ": _c(lambda: XMatQ.init(11), lambda: _x_spd(5, 11, 30.0), 0.05, 3000, 0.2, 0.8),
    "xmat_even_PRO": _c(lambda: XMatQ.init(10, geometry="PRO"), lambda: _x_spd(5, 10, 30.0),
                        0.05, 3000, 0.2, 0.8),
    # S = D(I + WWᵀ)D, rank(W) = 2; measured 0.110 (initial 0.45; a rank-0 fit: 0.55)
    "lra_rank2": _c(lambda: LRAQ.init(12, rank=2, key=jax.random.PRNGKey(1)),
                    lambda: _lra_spd(7, 12, 2), 0.05, 3000, 0.2, 0.4),
    "lra_rank0_same": _c(lambda: LRAQ.init(12, rank=0), lambda: _lra_spd(7, 12, 2),
                         0.05, 3000, 1.0, 0.4),
    # diagonal S over 1..10; measured 0.064 (initial 1.33)
    "lra_rank0_diag": _c(lambda: LRAQ.init(12, rank=0), lambda: jnp.diag(jnp.logspace(0, 1, 12)),
                         0.05, 3000, 0.12, 0.5),
    # S = A ⊗ B on the (permuted) 6×6 matrix view, each condition number 10; measured 0.103
    "affine_3d_perm": _c(lambda: AffineQ.init((2, 6, 3)), lambda: _affine_spd((2, 6, 3), 10.0, 3),
                         0.05, 2000, 0.2, 0.7),
    # diagonal Σ over 0.1..10; measured 0.062 (initial 0.59)
    "diag": _c(lambda: DiagQ.init((3, 4)), lambda: jnp.diag(jnp.logspace(-0.5, 0.5, 12)),
               0.05, 2000, 0.12, 0.5),
}
_WHITEN_SLOW = {
    **{f"dense_{g}": _c(functools.partial(DenseQ.init, 16, geometry=g),
                        lambda: spd(jax.random.PRNGKey(1), 16, 10.0), 0.05, 4000, 0.2, 0.5)
       for g in pe.GEOMETRIES},
    **{f"xmat_{g}": _c(functools.partial(XMatQ.init, 11, geometry=g),
                       lambda: _x_spd(6, 11, 30.0), 0.05, 4000, 0.2, 0.8)
       for g in pe.GEOMETRIES},
    "lra_rank4": _c(lambda: LRAQ.init(12, rank=4), lambda: _lra_spd(7, 12, 2),
                    0.05, 4000, 0.2, 0.4),
    "affine_vector": _c(lambda: AffineQ.init((6,)), lambda: _affine_spd((6,), 10.0, 3),
                        0.05, 2000, 0.2, 0.5),
    "affine_matrix_EQ": _c(lambda: AffineQ.init((5, 4), geometry="EQ"),
                           lambda: _affine_spd((5, 4), 10.0, 3), 0.05, 2000, 0.2, 0.7),
    "kron_3d": _c(lambda: KronQ.init((4, 3, 2)),
                  lambda: jnp.kron(jnp.kron(spd(jax.random.PRNGKey(1), 4, 10.0),
                                            spd(jax.random.PRNGKey(2), 3, 10.0)),
                                   jnp.diag(jnp.array([1.0, 3.0]))),
                  0.05, 3000, 0.2, 0.7),
}

_NEWTON_FAST = {
    # random SPD H with condition number 100, from Q = I; measured 0.004 (initial 2.12)
    "dense_PRO": _c(lambda: DenseQ.init(12), lambda: spd(jax.random.PRNGKey(2), 12, 100.0),
                    0.1, 600, 0.1, 1.0),
    # H = H₁ ⊗ H₂, each with condition number 30; measured 2.5e-4 (initial 3.62)
    "kron_PRO": _c(lambda: KronQ.init((6, 4)),
                   lambda: jnp.kron(spd(jax.random.PRNGKey(11), 6, 30.0),
                                    spd(jax.random.PRNGKey(12), 4, 30.0)),
                   0.1, 300, 0.1, 1.0),
    # diagonal H over 1..100; measured 1.7e-3 (initial 2.12)
    "diag_PRO": _c(lambda: DiagQ.init((3, 4)), lambda: jnp.diag(jnp.logspace(0.0, 2.0, 12)),
                   0.1, 300, 0.1, 1.0),
    # measured 0.013 (EQ's full-X group converges slower than PRO: 2e-6)
    "xmat_odd_EQ": _c(lambda: XMatQ.init(11), lambda: _x_spd(5, 11, 30.0), 0.1, 1000, 0.05, 1.0),
    # measured 0.025 (initial 0.45)
    "lra_rank2": _c(lambda: LRAQ.init(12, rank=2, key=jax.random.PRNGKey(1)),
                    lambda: _lra_spd(7, 12, 2), 0.3, 2000, 0.05, 0.4),
    # measured 1.3e-6
    "affine_3d_perm": _c(lambda: AffineQ.init((2, 6, 3)), lambda: _affine_spd((2, 6, 3), 10.0, 3),
                         0.1, 300, 1e-3, 1.0),
}
_NEWTON_SLOW = {
    **{f"dense_{g}": _c(functools.partial(DenseQ.init, 16, geometry=g),
                        lambda: spd(jax.random.PRNGKey(3), 16, 100.0),
                        # EQ's triangular group is slower here (‖Q⁻ᵀv‖² is large): lr 1
                        1.0 if g == "EQ" else 0.1, 2000, 0.02, 1.0)
       for g in pe.GEOMETRIES},
    **{f"kron_{g}": _c(functools.partial(KronQ.init, (6, 4), geometry=g),
                       lambda: jnp.kron(spd(jax.random.PRNGKey(11), 6, 30.0),
                                        spd(jax.random.PRNGKey(12), 4, 30.0)),
                       1.0 if g == "EQ" else 0.1, 1000, 0.01, 1.0)
       for g in pe.GEOMETRIES},
    "kron_dense_x_diag": _c(lambda: KronQ.init((5, 4), dense=(True, False)),
                            lambda: jnp.kron(spd(jax.random.PRNGKey(13), 5, 30.0),
                                             jnp.diag(jnp.linspace(1.0, 10.0, 4))),
                            0.1, 400, 0.1, 1.0),
    **{f"diag_{g}": _c(functools.partial(DiagQ.init, (3, 4), geometry=g),
                       lambda: jnp.diag(jnp.logspace(0.0, 2.0, 12)),
                       1.0 if g == "EQ" else 0.1, 1000, 0.01, 1.0)
       for g in pe.GEOMETRIES},
    **{f"xmat_even_{g}": _c(functools.partial(XMatQ.init, 10, geometry=g),
                            lambda: _x_spd(5, 10, 30.0), 0.1, 1000, 0.05, 1.0)
       for g in pe.GEOMETRIES},
    "lra_rank0_diag": _c(lambda: LRAQ.init(9, rank=0), lambda: jnp.diag(jnp.logspace(0, 1, 9)),
                         0.3, 1000, 1e-3, 0.3),
    "lra_rank0_same": _c(lambda: LRAQ.init(12, rank=0), lambda: _lra_spd(7, 12, 2),
                         0.3, 2000, 1.0, 0.4),
    **{f"affine_{shape}_{g}": _c(functools.partial(AffineQ.init, shape, geometry=g),
                                 functools.partial(_affine_spd, shape, 10.0, 3),
                                 0.1, 1000, 1e-3 if g != "EQ" else 0.05, 1.0)
       for shape in ((6,), (5, 4), (3, 5, 2)) for g in ("PRO", "EQ", "QUAD4P")},
}


_TABLES = {"whiten_fast": _WHITEN_FAST, "whiten_slow": _WHITEN_SLOW,
           "newton_fast": _NEWTON_FAST, "newton_slow": _NEWTON_SLOW}


@functools.cache
def _fits(kind: str) -> dict:
    """Run a whole table of fits in one compiled program; name → (P, S⁻¹, P₀)."""
    newton = kind.startswith("newton")
    table = _TABLES[kind]
    cases = {n: (make(), s(), newton, lr, steps)
             for n, (make, s, lr, steps, _, _) in table.items()}
    out = _fit_many(cases, jax.random.PRNGKey(0))
    return {n: (out[n].as_matrix(), jnp.linalg.inv(cases[n][1]), cases[n][0].as_matrix())
            for n in table}


def _fit_params(fast: dict, slow: dict, prefix: str):
    return [pytest.param(f"{prefix}_fast", n) for n in fast] + [
        pytest.param(f"{prefix}_slow", n, marks=pytest.mark.slow) for n in slow
    ]


def _check_fit(kind: str, name: str):
    *_, threshold, init_err = _TABLES[kind][name]
    p, target, p0 = _fits(kind)[name]
    err, err0 = _rel(p, target), _rel(p0, target)
    assert err0 > init_err, err0  # the initial Q is far off: the fit did the work
    assert err <= threshold, err
    return err


@pytest.mark.parametrize("kind,name", _fit_params(_WHITEN_FAST, _WHITEN_SLOW, "whiten"))
def test_whitening_fixed_point(kind, name):
    _check_fit(kind, name)


@pytest.mark.parametrize("kind,name", _fit_params(_NEWTON_FAST, _NEWTON_SLOW, "newton"))
def test_newton_fixed_point(kind, name):
    _check_fit(kind, name)


def test_whitening_lra_beats_diagonal():
    """On Σ^(1/2) = D(I + WWᵀ)D the rank-2 LRA fit is much closer than a diagonal one."""
    fits = _fits("whiten_fast")
    err = _rel(*fits["lra_rank2"][:2])
    err_diag = _rel(*fits["lra_rank0_same"][:2])
    assert err < 0.6 * err_diag, (err, err_diag)


def test_fitted_xmat_keeps_x_shape():
    p, _, _ = _fits("whiten_fast")["xmat_odd_EQ"]
    n = p.shape[0]
    mask = (jnp.eye(n) + jnp.eye(n)[::-1]) > 0
    assert float(jnp.max(jnp.abs(jnp.where(mask, 0.0, p)))) == 0.0


@pytest.mark.slow
def test_newton_lra_rank0_cannot_fit_low_rank():
    fits = _fits("newton_slow")
    assert _rel(*fits["lra_rank0_same"][:2]) > 0.3


# -- jit, vmap, serialisation ------------------------------------------------------------

_VMAP = ["dense", "xmat_odd", "lra_rank2", "affine_3d_perm", "diag", "kron_3d_mixed"]


@eqx.filter_jit
def _vmapped_step(qs: dict, vs: dict, hs: dict, gs: dict, keys):
    def one(qs, vs, hs, gs, key):
        new = {n: q.update(vs[n], hs[n], lr=0.5, key=key) for n, q in qs.items()}
        return new, {n: q.apply(gs[n]) for n, q in new.items()}

    return jax.vmap(one)(qs, vs, hs, gs, keys)


@functools.cache
def _vmap_run():
    b = 3
    qs = {n: jax.vmap(lambda _, m=_FAST[n]: m())(jnp.arange(b)) for n in _VMAP}
    key = jax.random.PRNGKey(8)
    rounds = []
    for _ in range(2):  # the second round starts from distinct preconditioners
        key, kv, kh, kg, kk = jax.random.split(key, 5)
        scale = jnp.array([1.0, 10.0, 0.1], jnp.float32)
        vs = {n: jax.random.normal(kv, (b,) + _shape(_index(q, 0))) for n, q in qs.items()}
        hs = {n: jnp.einsum("b,b...->b...", scale, jax.random.normal(kh, vs[n].shape))
              for n in qs}
        gs = {n: jax.random.normal(kg, vs[n].shape) for n in qs}
        keys = jax.random.split(kk, b)
        before = qs
        qs, outs = _vmapped_step(qs, vs, hs, gs, keys)
        rounds.append((before, vs, hs, gs, keys, qs, outs))
    return rounds


@pytest.mark.parametrize("name", _VMAP)
def test_vmap_matches_single(name):
    """vmap of update/apply over a stacked batch equals one jitted update per element."""
    base = _inits("fast")
    for before, vs, hs, gs, keys, after, outs in _vmap_run():
        batch = before[name]
        assert jax.tree.structure(after[name]) == jax.tree.structure(batch)
        for i in range(3):
            # the shared compiled update of `_FAST`, with element i swapped in
            single = _update_all({**base, name: _index(batch, i)},
                                 {n: _random_pair(keys[i], q)[0] for n, q in base.items()}
                                 | {name: vs[name][i]},
                                 {n: _random_pair(keys[i], q)[1] for n, q in base.items()}
                                 | {name: hs[name][i]}, keys[i])[name]
            assert eqx.tree_equal(_index(after[name], i), single, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(outs[name][i], single.apply(gs[name][i]),
                                       rtol=1e-4, atol=1e-5)
    # fitted to differently scaled data, the batch members differ
    last = _vmap_run()[-1][5][name]
    assert _rel(_index(last, 1).as_matrix(), _index(last, 0).as_matrix()) > 0.1


def test_jit_matches_eager():
    """One eager update equals the jitted one (XMatQ with its middle element, DiagQ)."""
    qs = _fitted("fast")
    for name in ("xmat_odd", "diag"):
        q = qs[name]
        v, h = _random_pair(jax.random.PRNGKey(5), q)
        eager = q.update(v, h, lr=0.5, key=jax.random.PRNGKey(6))
        pairs = {n: _random_pair(jax.random.PRNGKey(5), x) for n, x in qs.items()}
        jitted = _update_all(qs, {n: p[0] for n, p in pairs.items()},
                             {n: p[1] for n, p in pairs.items()}, jax.random.PRNGKey(6))[name]
        assert eqx.tree_equal(eager, jitted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", _PARAMS)
def test_serialise_round_trip(name, tmp_path):
    q0, q, _ = _case(name)
    fresh = _group(name)[name]()
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, q)
    buf.seek(0)
    back = eqx.tree_deserialise_leaves(buf, fresh)
    assert eqx.tree_equal(back, q)
    assert not eqx.tree_equal(q0, q)  # the round trip restored the fitted state
    path = tmp_path / "q.eqx"
    eqx.tree_serialise_leaves(path, q)
    assert eqx.tree_equal(eqx.tree_deserialise_leaves(path, fresh), q)
    g = jnp.ones(_shape(q), _dtype(q))
    assert eqx.tree_equal(back.apply(g), q.apply(g))




def _bad_inputs(q):
    """(v, h) pairs with one NaN/±Inf entry in h or v at the first, middle and last index."""
    v, h = _random_pair(jax.random.PRNGKey(11), q, scale=1.0)
    n = math.prod(_shape(q))
    out = []
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for pos in sorted({0, n // 2, n - 1}):
            poison = lambda x: x.reshape(-1).at[pos].set(bad).reshape(x.shape)  # noqa: E731
            out += [((bad, pos, "h"), v, poison(h)), ((bad, pos, "v"), poison(v), h)]
    return out


@pytest.mark.parametrize(
    "name",
    list(_FAST),
)
def test_non_finite_inputs_leave_state_unchanged(name):
    qs = _fitted("fast")
    q = qs[name]
    pairs = {n: _random_pair(jax.random.PRNGKey(11), x, scale=1.0) for n, x in qs.items()}
    vs, hs = {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}
    key = jax.random.PRNGKey(12)
    # sanity: the finite pair does move Q
    assert not eqx.tree_equal(_update_all(qs, vs, hs, key)[name], q)
    failures = []
    for what, v, h in _bad_inputs(q):
        new = _update_all(qs, vs | {name: v}, hs | {name: h}, key)[name]
        if not (eqx.tree_equal(new, q) and tree_finite(new)):
            failures.append(what)
    assert not failures, failures


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [n for n in _FAST if not _FAST[n]().needs_v],
)
def test_non_finite_whitening_without_v(name):
    q = _fitted("fast")[name]
    update = eqx.filter_jit(lambda q, h: q.update(None, h, lr=0.5, key=jax.random.PRNGKey(0)))
    for _, _, h in _bad_inputs(q)[::2]:
        new = update(q, h)
        assert eqx.tree_equal(new, q) and tree_finite(new)


def test_xmat_middle_non_finite_skips_whole_step():
    """Odd n: a NaN at the middle index (fitted by the middle DiagQ) skips the whole step,
    the 2×2 blocks and L included."""
    q = XMatQ.init(3)
    h = jnp.array([1.0, jnp.nan, 2.0], jnp.float32)
    new = q.update(jnp.ones(3), h, lr=0.5, key=jax.random.PRNGKey(0))
    assert eqx.tree_equal(new.middle, q.middle)
    assert eqx.tree_equal(new, q)


@pytest.mark.parametrize("name", _PARAMS)
def test_rescale_scales_p_by_square(name):
    _, q, _ = _case(name)
    p = q.as_matrix()
    np.testing.assert_allclose(q.rescale(3.0).as_matrix(), 9.0 * p, rtol=1e-4,
                               atol=1e-6 * float(jnp.max(jnp.abs(p))))


def test_init_scale_and_state_bytes():
    for geometry in pe.GEOMETRIES:
        for q in (DenseQ.init(4, geometry=geometry, init_scale=2.0),
                  XMatQ.init(5, geometry=geometry, init_scale=2.0),
                  DiagQ.init((2, 3), geometry=geometry, init_scale=2.0),
                  KronQ.init((3, 2), geometry=geometry, init_scale=2.0),
                  AffineQ.init((3, 2), geometry=geometry, init_scale=2.0)):
            n = math.prod(_shape(q))
            np.testing.assert_allclose(q.as_matrix(), 4.0 * jnp.eye(n), rtol=1e-6)
    np.testing.assert_allclose(LRAQ.init(5, rank=2, init_scale=2.0).as_matrix(),
                               4.0 * jnp.eye(5), rtol=1e-6)
    assert DenseQ.init(10).state_bytes == 10 * 10 * 4 + 4
    assert XMatQ.init(10).state_bytes == 5 * 4 * 4 + 4
    assert LRAQ.init(10, rank=3).state_bytes == (2 * 10 * 3 + 10 + 3) * 4
    assert DiagQ.init((3, 4)).state_bytes == (12 + 1) * 4


# -- validation ---------------------------------------------------------------------------


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


def _raises_typed(match: str):
    """A wrong shape/type that the jaxtyping annotations already catch: the suite runs with
    runtime type checking (a `TypeCheckError` naming the parameter comes first); without it
    the constructor's own check raises `ValueError`."""
    return pytest.raises((ValueError, jaxtyping.TypeCheckError), match=match)


def test_lra_validation():
    for rank in (-1, 6, 10, True):
        with _raises("rank"):
            LRAQ.init(6, rank=rank)
    with _raises_typed("rank"):
        LRAQ.init(6, rank=2.0)
    with _raises("dtype"):
        LRAQ.init(6, jnp.complex64, rank=1)
    assert LRAQ.init(6, rank=5).rank == 5  # the largest allowed rank
    q = LRAQ.init(6, rank=2)
    with _raises(r"u, v of shape \(n, r\) and d of shape \(n,\) with n = 6"):
        LRAQ(q.u[:5], q.v[:5], q.d[:5], q.lipschitz, q.shape)  # consistent, but not n = 6
    with _raises_typed(r"\(n, r\)|parameter 'v'"):
        LRAQ(q.u, q.v[:, :1], q.d, q.lipschitz, q.shape)
    with _raises_typed(r"\(n, r\)|parameter 'd'"):
        LRAQ(q.u, q.v, q.d[:5], q.lipschitz, q.shape)
    with _raises_typed("lipschitz"):
        LRAQ(q.u, q.v, q.d, q.lipschitz[:2], q.shape)
    with _raises("LRAQ.apply"):
        q.apply(jnp.ones(5))
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


_SHAPE_CHECK = {
    "DenseQ": lambda: DenseQ.init((2, 3)),
    "XMatQ": lambda: XMatQ.init((2, 3)),
    "LRAQ": lambda: LRAQ.init((2, 3), rank=1),
    "AffineQ": lambda: AffineQ.init((2, 3)),
    "DiagQ": lambda: DiagQ.init((2, 3)),
    "KronQ": lambda: KronQ.init((2, 3)),
}


def _check_update_shape_error(q, v, h, bad_shape):
    """update must raise a ValueError that names the update and the offending shape
    (traced only: `eval_shape` runs no arithmetic)."""
    with pytest.raises(ValueError) as info:
        jax.eval_shape(lambda: q.update(v, h, lr=0.1, key=jax.random.PRNGKey(0)))
    msg = str(info.value)
    assert "update" in msg and str(tuple(bad_shape)) in msg, msg


@pytest.mark.parametrize(
    "name",
    list(_SHAPE_CHECK),
)
def test_update_rejects_wrong_h_shape(name):
    q = _SHAPE_CHECK[name]()
    v = jnp.ones((2, 3), jnp.float32)
    for bad in ((3, 2), (6,), (2, 1)):
        _check_update_shape_error(q, v, jnp.ones(bad, jnp.float32), bad)


@pytest.mark.parametrize(
    "name",
    list(_SHAPE_CHECK),
)
def test_update_rejects_wrong_v_shape(name):
    q = _SHAPE_CHECK[name]()
    h = jnp.ones((2, 3), jnp.float32)
    for bad in ((7,), (6,), (3, 2)):
        _check_update_shape_error(q, jnp.ones(bad, jnp.float32), h, bad)


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
    with _raises("factor 1"):
        KronQ((k.factors[0], jnp.eye(4)), k.lipschitz, None, (4, 3), (True, True), "PRO")
    with _raises("one factor per squeezed axis"):
        KronQ(k.factors[:1], k.lipschitz, None, (4, 3), (True, True), "PRO")
    with _raises("lipschitz"):
        KronQ(k.factors, k.lipschitz[:1], None, (4, 3), (True, True), "PRO")
    with _raises("dense"):
        KronQ.init((4, 3), dense=(True,))
    with _raises("KronQ.apply"):
        k.apply(jnp.ones((3, 4)))
    with _raises("KronQ.update"):
        k.update(None, jnp.ones((3, 4)), lr=0.1, key=jax.random.PRNGKey(0))
    d = DiagQ.init((3,))
    with _raises_typed("lipschitz"):
        DiagQ(d.d, jnp.zeros(2), "PRO")
    with _raises("geometry"):
        DiagQ(d.d, d.lipschitz, "bad")
    with _raises("DiagQ.apply"):
        d.apply(jnp.ones(4))


# -- the shared `update` template -----------------------------------------------------------


@pytest.mark.slow  # default-suite time budget
def test_update_template_guard_switch():
    """`AbstractPrecond.update` skips a non-finite step as a whole for the structures with
    their own fit; the composites leave that to their inner `update`s (per layer/block)."""
    for cls in (KronQ, DiagQ, DenseQ, XMatQ, LRAQ):
        assert cls._guards_finite, cls
    for cls in (AffineQ, pe.StackedQ, pe.BlockedQ):
        assert not cls._guards_finite, cls
    shape = (2, 3)
    h = jnp.ones(shape).at[0, 0].set(jnp.nan)
    for q in (KronQ.init(shape), DiagQ.init(shape), DenseQ.init(shape), XMatQ.init(shape),
              LRAQ.init(shape, rank=1), AffineQ.init(shape)):
        new = q.update(jnp.ones(shape), h, lr=0.3, key=jax.random.PRNGKey(0))
        assert eqx.tree_equal(new, q), type(q).__name__


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_blocked_non_finite_block_is_skipped_alone():
    shape = (8, 3)
    q = pe.BlockedQ.init(lambda s: KronQ.init(s), shape, shape, 4)  # two 4×3 blocks
    (group,) = q.groups
    h = jax.random.normal(jax.random.PRNGKey(1), shape).at[5, 1].set(jnp.nan)
    new = q.update(None, h, lr=0.3, key=jax.random.PRNGKey(2))
    moved = [not eqx.tree_equal(jax.tree.map(lambda x: x[i], new.groups[0]),
                                jax.tree.map(lambda x: x[i], group)) for i in range(2)]
    assert moved == [True, False]
    assert tree_finite(new)


def test_composite_needs_v_names_the_structure():
    inner = lambda s: KronQ.init(s, geometry="EQ")  # noqa: E731
    for q in (pe.StackedQ.init(inner, (2, 3, 4)), pe.BlockedQ.init(inner, (8, 3), (8, 3), 4),
              AffineQ.init((3, 4), geometry="EQ")):
        name = type(q).__name__
        with _raises(rf"`{name}\.update` needs the probe `v`"):
            q.update(None, jnp.ones(q.shape), lr=0.1, key=jax.random.PRNGKey(0))
