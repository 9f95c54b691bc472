"""The maths: fixed points of the whitening fit, and one step against the reference formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx as pe
from psgd_eqx._probe import damped_probe

from .helpers import mpow, spd


def _fit(q, sample, lr, steps, key, normaliser=pe.Normaliser()):
    """Refit `q` every step on fresh whitening probes of `sample(key)`."""

    def body(q, k):
        kz, kp, ku = jax.random.split(k, 3)
        v, h = damped_probe(kp, sample(kz))
        q = q.update(v if q.needs_v else None, h, lr=lr, key=ku, normaliser=normaliser)
        return q, None

    q, _ = jax.lax.scan(body, q, jax.random.split(key, steps))
    return q


def _rel(p, target):
    return float(jnp.linalg.norm(p - target) / jnp.linalg.norm(target))


@pytest.mark.parametrize("geometry", [  # three in the slow run (default-suite time budget)
    pytest.param(g, marks=pytest.mark.slow) if g in ("QEQ", "QEP", "QUAD4P") else g
    for g in pe.GEOMETRIES])
def test_whitening_fixed_point_matrix(geometry):
    """g ~ N(0, A⊗B), A 32×32 and B 16×16 with condition number 100: P → (A⊗B)^(−1/2)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    a, b = spd(k1, 32, 100.0), spd(k2, 16, 100.0)
    a_half, b_half = mpow(a, 0.5), mpow(b, 0.5)
    target = jnp.kron(mpow(a, -0.5), mpow(b, -0.5))

    def sample(k):
        return a_half @ jax.random.normal(k, (32, 16)) @ b_half

    q0 = pe.KronQ.init((32, 16), geometry=geometry)
    assert q0.dense == (True, True)
    err_fast = _rel(_fit(q0, sample, 0.1, 2000, k3).as_matrix(), target)
    err_slow = _rel(_fit(q0, sample, 0.03, 4000, k4).as_matrix(), target)
    assert err_fast <= 0.15, err_fast
    assert err_slow <= 0.08, err_slow
    # The error must come from the fit: the untouched initial Q is far off.
    assert _rel(q0.as_matrix(), target) > 0.5


@pytest.mark.parametrize("geometry", ["EQ", "PRO", "QUAD"])
def test_whitening_fixed_point_3d(geometry):
    """A rank-3 tensor: g ~ N(0, A⊗B⊗C) with one diagonal axis (C diagonal)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(1), 4)
    a, b = spd(k1, 8, 30.0), spd(k2, 6, 30.0)
    c = jnp.linspace(1.0, 10.0, 5)
    a_half, b_half = mpow(a, 0.5), mpow(b, 0.5)
    target = jnp.kron(jnp.kron(mpow(a, -0.5), mpow(b, -0.5)), jnp.diag(c**-0.5))

    def sample(k):
        z = jax.random.normal(k, (8, 6, 5))
        z = jnp.einsum("ai,bj,ijk->abk", a_half, b_half, z)
        return z * jnp.sqrt(c)[None, None, :]

    q0 = pe.KronQ.init((8, 6, 5), geometry=geometry, dense=(True, True, False))
    err = _rel(_fit(q0, sample, 0.05, 3000, k3).as_matrix(), target)
    assert err <= 0.12, err


def test_diag_fixed_point():
    """DiagQ whitening: |d|⁴ → 1/E[g²] element-wise."""
    var = jnp.linspace(0.1, 10.0, 24).reshape(4, 6)

    def sample(k):
        return jnp.sqrt(var) * jax.random.normal(k, (4, 6))

    q = _fit(pe.DiagQ.init((4, 6)), sample, 0.05, 3000, jax.random.PRNGKey(2))
    err = _rel(jnp.diag(q.as_matrix()), (var**-0.5).reshape(-1))
    assert err <= 0.1, err


# ---------------------------------------------------------------------------------------
# One step against a direct transcription of the reference (lixilinx psgd.py) formulas,
# written out for a real 2-D gradient G (m×n) with explicit matrices: P·G = P₁ G P₂ᵀ,
# Contract₀(X, X) = X Xᵀ, Contract₁(X, X) = Xᵀ X. Deterministic settings: the 1-step norm
# bound (psgd_jax's) and no balancing.


def _lb(a):
    """psgd_jax's one-step bound, transcribed (row form; our matrices are normal)."""
    a = np.asarray(a, np.float64)
    s = np.max(np.abs(a))
    if s == 0:
        return 0.0
    a = a / s
    j = np.argmax(np.sum(a * a, axis=1))
    y = a[j] @ a
    return s * np.linalg.norm(y @ a) / np.linalg.norm(y)


def _procrustes(q):
    r = q.T - q
    r = r / (_lb(r) + np.finfo(np.float32).tiny)
    rq = r @ q
    rrq = r @ rq
    tr_rq, tr_rrq = np.trace(rq), np.trace(rrq)
    a = min(-tr_rq / tr_rrq, 1 / 8) if tr_rrq < 0 else 1 / 8
    return q + a * (rq + 0.5 * a * rrq)


def _procrustes3(q):
    """The reference's PRO4P projection: up to 10 third-order steps until ≈ symmetric."""
    for _ in range(10):
        r = q.T - q
        r = r / (_lb(r) + np.finfo(np.float32).tiny)
        rq = r @ q
        rrq = r @ rq
        rrrq = r @ rrq
        t1, t2, t3 = np.trace(rq), np.trace(rrq), np.trace(rrrq)
        if t1 > 0 and t3 < 0:
            a = (-t2 - np.sqrt(t2 * t2 - 1.5 * t1 * t3)) / (0.75 * t3)
            a = min(a, 1 / 3)
            q = q + a * (rq + 0.5 * a * (rrq + 0.25 * a * rrrq))
        if np.max(np.abs(q.T - q)) < 1e-3 * np.max(np.abs(q)):
            break
    return q


def _reference_step(geometry, q1, q2, l1, l2, g, v, lr, beta=0.9, whiten=True):
    """The reference update of factors (q1 dense m×m, q2 dense n×n) and L, in float64."""
    q1, q2, g, v = (np.asarray(x, np.float64) for x in (q1, q2, g, v))
    m, n = g.shape
    numel = m * n
    if geometry == "EQ":
        a = q1 @ g @ q2.T
        b = np.linalg.inv(q1).T @ v @ np.linalg.inv(q2)
        stats = [(a @ a.T, b @ b.T), (a.T @ a, b.T @ b)]
    else:
        p1, p2 = (q1, q2) if geometry.endswith("4P") else (q1.T @ q1, q2.T @ q2)
        pg = p1 @ g @ p2.T
        if geometry == "QEP":
            # QEP balances the factors before every update (its L is not scale-invariant)
            n1, n2 = np.max(np.abs(q1)), np.max(np.abs(q2))
            q1, q2 = q1 * np.sqrt(n1 * n2) / n1, q2 * np.sqrt(n1 * n2) / n2
            p1, p2 = q1.T @ q1, q2.T @ q2
            pg = p1 @ g @ p2.T
            y1, y2 = q1 @ pg, pg @ q2.T
            stats = [
                (y1 @ y1.T, numel / m * q1 @ q1.T),
                (y2.T @ y2, numel / n * q2 @ q2.T),
            ]
        else:
            stats = [(pg @ pg.T, numel / m), (pg.T @ pg, numel / n)]
    out_q, out_l = [], []
    for q, big_l, (t1, t2) in zip((q1, q2), (l1, l2), stats):
        if np.ndim(t2) == 0:
            ell = _lb(t1) + t2
            e = t1 - t2 * np.eye(q.shape[0])
        else:
            ell = _lb(t1 + t2)
            e = t1 - t2
        big_l = max(beta * big_l + (1 - beta) * ell, ell)
        eta = lr / big_l
        if geometry == "EQ":
            q = q - eta * np.triu(e) @ q
        elif geometry == "QEQ":
            q = q - eta * q @ e
        elif geometry == "QEP":
            q = q - eta * e @ q
        elif geometry == "PRO":
            q = _procrustes(q - eta * e @ q)
        elif geometry == "PRO4P":
            q = _procrustes3(q - eta * e @ q)
        elif geometry in ("QUAD", "QUAD4P"):
            step = eta / 2 if geometry == "QUAD" else eta
            p = q - step * e @ q
            p = p - step * p @ e
            q = (p + p.T) / 2
        out_q.append(q)
        out_l.append(big_l)
    return out_q, out_l


@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
def test_one_step_matches_reference(geometry):
    key = jax.random.PRNGKey(3)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    m, n = 7, 5
    # A non-trivial starting point: perturbed (triangular for EQ) factors, non-zero L.
    q1 = jnp.eye(m) + 0.1 * jax.random.normal(k1, (m, m))
    q2 = 0.7 * jnp.eye(n) + 0.1 * jax.random.normal(k2, (n, n))
    if geometry == "EQ":
        q1, q2 = jnp.triu(q1), jnp.triu(q2)
    lip = jnp.array([3.0, 0.5], jnp.float32)
    q = pe.KronQ((q1, q2), lip, None, (m, n), (True, True), geometry)
    g = jax.random.normal(k3, (m, n))
    v = jax.random.normal(k4, (m, n))
    norm = pe.Normaliser(beta=0.9, bound="one_step")
    new = q.update(v if q.needs_v else None, g, lr=0.3, key=key, normaliser=norm,
                   balance_probability=0.0)
    (r1, r2), (rl1, rl2) = _reference_step(geometry, q1, q2, 3.0, 0.5, g, v, 0.3)
    # PRO4P stops its Procrustes loop at a relative asymmetry of 1e-3: f32 and f64 may stop
    # one iteration apart, both inside that tolerance.
    atol = 2e-4 if geometry == "PRO4P" else 1e-5
    np.testing.assert_allclose(new.factors[0], r1, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(new.factors[1], r2, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(new.lipschitz, [rl1, rl2], rtol=1e-5)
    # and the step is not a no-op
    assert float(jnp.max(jnp.abs(new.factors[0] - q1))) > 1e-4


@pytest.mark.parametrize("geometry", pe.GEOMETRIES)
def test_one_step_diag_factor(geometry):
    """A dense ⊗ diagonal Kron factor pair: the diagonal rule of the reference."""
    key = jax.random.PRNGKey(4)
    k1, k2, k3 = jax.random.split(key, 3)
    m, n = 6, 9
    q1 = jnp.eye(m) + 0.05 * jax.random.normal(k1, (m, m))
    if geometry == "EQ":
        q1 = jnp.triu(q1)
    q2 = 1.0 + 0.2 * jax.random.uniform(k2, (n,))
    q = pe.KronQ((q1, q2), jnp.zeros(2), None, (m, n), (True, False), geometry)
    g = jax.random.normal(k3, (m, n))
    v = jax.random.normal(k1, (m, n))
    norm = pe.Normaliser(beta=0.9, bound="one_step")
    new = q.update(v if q.needs_v else None, g, lr=0.2, key=key, normaliser=norm,
                   balance_probability=0.0)
    # Reference diagonal rule for factor 2, computed here independently.
    q1n, q2n, gn, vn = (np.asarray(x, np.float64) for x in (q1, q2, g, v))
    if geometry == "EQ":
        a = q1n @ gn * q2n
        b = np.linalg.inv(q1n).T @ vn / q2n
        t1, t2 = np.sum(a * a, 0), np.sum(b * b, 0)
    else:
        if geometry.endswith("4P"):  # the factors are P: applied once
            pg = q1n @ gn * q2n
        else:
            pg = q1n.T @ q1n @ gn * q2n**2
        if geometry == "QEP":
            t1, t2 = np.sum((pg * q2n) ** 2, 0), m * q2n**2
        else:
            t1, t2 = np.sum(pg * pg, 0), float(m)
    ell = np.max(t1 + t2)
    eta = 0.2 / ell
    if geometry in ("QUAD", "QUAD4P"):
        step = eta / 2 if geometry == "QUAD" else eta
        want = q2n * (1 - step * (t1 - t2)) ** 2
    else:
        want = q2n - eta * (t1 - t2) * q2n
    if geometry == "QEP":  # QEP balances before its step; undo the balancing scale
        s = np.exp(np.mean(np.log([np.max(np.abs(q1n)), np.max(np.abs(q2n))])))
        q2b = q2n * s / np.max(np.abs(q2n))
        q1b = q1n * s / np.max(np.abs(q1n))
        pg = q1b.T @ q1b @ gn * q2b**2
        t1, t2 = np.sum((pg * q2b) ** 2, 0), m * q2b**2
        eta = 0.2 / np.max(t1 + t2)
        want = q2b - eta * (t1 - t2) * q2b
    np.testing.assert_allclose(new.factors[1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_norm_bounds_are_lower_bounds(getkey):
    for bound in ("subspace", "one_step"):
        norm = pe.Normaliser(bound=bound)
        for n in (3, 17, 64):
            x = jax.random.normal(getkey(), (n, n))
            spd_m = x @ x.T
            skew = x - x.T
            for a in (spd_m, skew):
                true = float(jnp.linalg.norm(a, 2))
                lb = float(norm.norm_lower_bound(a, getkey()))
                assert lb <= true * (1 + 1e-5)
                assert lb >= 0.5 * true  # tight enough to be a useful normaliser
    assert float(pe.Normaliser().norm_lower_bound(jnp.zeros((4, 4)), getkey())) == 0.0


def test_lipschitz_ema():
    norm = pe.Normaliser(beta=0.9)
    # rising ℓ is taken at once; falling ℓ decays geometrically
    assert float(norm.lipschitz(jnp.float32(1.0), jnp.float32(5.0))) == 5.0
    np.testing.assert_allclose(float(norm.lipschitz(jnp.float32(5.0), jnp.float32(1.0))), 4.6)
    inst = pe.Normaliser(beta=0.0)
    assert float(inst.lipschitz(jnp.float32(5.0), jnp.float32(1.0))) == 1.0


def test_procrustes_makes_factor_symmetric(getkey):
    """Repeated PRO steps drive a rotated SPD factor back towards the SPD (polar) factor."""
    from psgd_eqx._geometry import procrustes_step

    x = jax.random.normal(getkey(), (8, 8))
    s = x @ x.T / 8 + jnp.eye(8)
    rot = jax.scipy.linalg.expm(0.2 * (x - x.T) / 8)
    q = rot @ s
    for _ in range(60):
        q = procrustes_step(q, getkey(), pe.Normaliser())
    np.testing.assert_allclose(q, q.T, atol=2e-3)
    # the Procrustes step is a rotation: P = QᵀQ is preserved
    np.testing.assert_allclose(q.T @ q, (rot @ s).T @ (rot @ s), rtol=1e-3, atol=1e-3)


def test_balance_preserves_product(getkey):
    from psgd_eqx._geometry import balance_factors

    a = 100.0 * jax.random.normal(getkey(), (4, 4))
    b = 0.01 * jax.random.normal(getkey(), (3,))
    na, nb = balance_factors((a, b))
    np.testing.assert_allclose(jnp.kron(na.T @ na, jnp.diag(nb**2)),
                               jnp.kron(a.T @ a, jnp.diag(b**2)), rtol=1e-4)
    np.testing.assert_allclose(jnp.max(jnp.abs(na)), jnp.max(jnp.abs(nb)), rtol=1e-5)


# -- the statistics of each geometry (`_geometry.fit_statistics`) ------------------------


@pytest.mark.parametrize("with_v", [True, False])
@pytest.mark.parametrize("geometry", ["EQ", "QEP", "PRO", "PRO4P"])
def test_fit_statistics_follow_the_geometry_table(geometry, with_v):
    """`fit_statistics` on KronQ's primitives against the module table, written out with
    explicit Kronecker matrices for Q = Q₀ ⊗ diag(q₁) on a (3, 4) tensor: T₁, T₂ contract
    Q·h, Q⁻ᴴ·v (EQ), Qᵢ·(P·h), Qᵢ·v (QEP) or P·h, v (the others); integrated out,
    T₂ = c·QᵢQᵢᴴ (QEP) or c·I, c = N/nᵢ."""
    from psgd_eqx._geometry import Outer, fit_statistics
    from psgd_eqx._precond.kron import _KronContractions

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    q0 = jnp.triu(0.3 * jax.random.normal(k[0], (3, 3))) + 1.5 * jnp.eye(3)
    q1 = 1.0 + 0.5 * jax.random.uniform(k[1], (4,))
    h = jax.random.normal(k[2], (3, 4))
    v = jax.random.normal(k[3], (3, 4)) if with_v else None
    stores_p = geometry == "PRO4P"
    ops = _KronContractions((q0, q1), None, (True, False), stores_p)
    if v is None and geometry == "EQ":
        with pytest.raises(ValueError, match="needs the probe"):
            fit_statistics(geometry, ops, h, v)
        return
    stats = fit_statistics(geometry, ops, h, v)

    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    q0n, q1n, hn = f64(q0), f64(q1), f64(h).reshape(-1)
    big_q = np.kron(q0n, np.diag(q1n))
    big_p = big_q if stores_p else big_q.T @ big_q
    per_axis = (lambda x: x @ x.T, lambda x: np.sum(x * x, axis=0))  # Contract₀, Contract₁
    carry = (lambda x: q0n @ x, lambda x: x * q1n[None, :])  # Qᵢ along axis i
    if geometry == "EQ":
        a = (big_q @ hn).reshape(3, 4)
        b = (np.linalg.inv(big_q).T @ f64(v).reshape(-1)).reshape(3, 4)
        want = [(c(a), c(b)) for c in per_axis]
    else:
        pg = (big_p @ hn).reshape(3, 4)
        qep = geometry == "QEP"
        want = []
        for i, (c, n, qq) in enumerate(zip(per_axis, (4, 3), (q0n @ q0n.T, q1n * q1n))):
            t1 = c(carry[i](pg) if qep else pg)
            if v is not None:
                t2 = c(carry[i](f64(v)) if qep else f64(v))
            else:
                t2 = n * qq if qep else np.float64(n)
            want.append((t1, t2))
    for (t1, t2), (w1, w2) in zip(stats, want):
        for got, ref in ((t1, w1), (t2, w2)):
            got = got.matrix() if isinstance(got, Outer) else got
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
