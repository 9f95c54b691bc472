"""`psgd_eqx.diagnostics` (figures read from the preconditioners, and those tracked during
`update` with `track_diagnostics=True`) and `psgd_eqx.plot_diagnostics`."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx
from psgd_eqx._numerics import safe_rms

from .helpers import tree_finite


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w": jax.random.normal(k1, (16, 8)), "b": jnp.zeros(8),
            "s": jax.random.normal(k2, (3, 6, 5))}


def _grads(params, key, scale=1.0):
    keys = jax.random.split(key, 3)
    return {k: scale * jax.random.normal(kk, p.shape)
            for (k, p), kk in zip(sorted(params.items()), keys)}


SCANNED = {"w": False, "b": False, "s": True}


def test_figures_read_from_the_preconditioners():
    params = _params()
    opt = psgd_eqx.scale_by_kron(scanned_layers=SCANNED, max_skew_triangular=math.inf)
    state = opt.init(params)
    report = psgd_eqx.diagnostics(state)
    assert set(report) == {"['w']", "['b']", "['s']"}
    w = report["['w']"]
    assert w.factor_names == ("axis 0 (16, dense)", "axis 1 (8, dense)")
    assert w.update_rms is None and w.clipped is None and w.fit_residual is None
    assert int(w.refits) == 0
    # at init every factor is the identity: conditioning 1
    np.testing.assert_allclose(w.conditioning, [1.0, 1.0])
    # a scanned stack: one value per layer
    s = report["['s']"]
    assert all(x.shape == (3,) for x in (*s.lipschitz, *s.conditioning))
    # a known factor: a triangular Q with diagonal (1, ..., 1, 50) has conditioning 50
    st = state
    q = st.preconditioner("['w']")
    f0 = q.factors[0].at[3, 3].set(50.0).at[0, 5].set(7.0)  # off-diagonal: ignored
    lip = q.lipschitz.at[1].set(3.5)
    new_q = eqx.tree_at(lambda x: (x.factors[0], x.lipschitz), q, (f0, lip))
    tree = st.preconditioners()
    tree["w"] = new_q
    layout = st.precond
    from psgd_eqx._layout import LeafBuckets

    rebuilt = LeafBuckets.build(layout.treedef.flatten_up_to(tree), layout.groups,
                                layout.treedef, layout.owner)
    report = psgd_eqx.diagnostics(dataclasses.replace(st, precond=rebuilt))
    np.testing.assert_allclose(report["['w']"].conditioning, [50.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(report["['w']"].lipschitz[1], 3.5)


def test_stored_p_geometry_reports_the_conditioning_of_q():
    q = psgd_eqx.KronQ.init((4, 4), geometry="PRO4P")  # stored factors: identities
    from psgd_eqx._diagnostics import leaf_diagnostics

    f0 = q.factors[0].at[1, 1].set(100.0)  # P's entry 100 = Q's entry 10
    q2 = eqx.tree_at(lambda x: x.factors[0], q, f0)
    d = leaf_diagnostics(q2, jnp.zeros((), jnp.int32), None)
    np.testing.assert_allclose(d.conditioning[0], 10.0, rtol=1e-6)


def test_tracked_figures_match_a_recomputation():
    params = _params()
    common = dict(scanned_layers=SCANNED, track_diagnostics=True, b1=0.0,
                  preconditioner_update_probability=1.0)
    free = psgd_eqx.scale_by_kron(grad_clip_max_amp=None, grad_clip_max_element=None, **common)
    tight = psgd_eqx.scale_by_kron(grad_clip_max_amp=0.05, **common)
    s_free, s_tight = free.init(params), tight.init(params)
    step_free, step_tight = jax.jit(free.update), jax.jit(tight.update)
    for i in range(2):
        g = _grads(params, jax.random.PRNGKey(i + 1))
        before = s_free
        u, s_free = step_free(g, s_free, params)
        _, s_tight = step_tight(g, s_tight, params)
    report = psgd_eqx.diagnostics(s_free)
    for name, leaf in report.items():
        key = name[2]
        # no clip: the update is P·m itself (b1 = 0: m = g), its RMS per layer
        want = (jax.vmap(safe_rms)(u[key]) if key == "s" else safe_rms(u[key]))
        np.testing.assert_allclose(leaf.update_rms, want, rtol=1e-5)
        assert not bool(jnp.any(leaf.clipped))
        # ρ: log(‖P_old·g‖² / n) with the preconditioner before this step's refit
        q_old = before.preconditioner(name)
        if key == "s":
            px = jax.vmap(lambda qi, gi: qi.apply(gi))(q_old.inner, g[key])
            rho = jnp.log(jnp.sum(px**2, axis=(1, 2)) / px[0].size)
        else:
            px = q_old.apply(g[key])
            rho = jnp.log(jnp.sum(px**2) / px.size)
        np.testing.assert_allclose(leaf.fit_residual, rho, rtol=1e-4, atol=1e-5)
    tight_report = psgd_eqx.diagnostics(s_tight)
    assert all(bool(jnp.all(v.clipped)) for v in tight_report.values())
    assert int(report["['w']"].refits) == 2


@pytest.mark.slow  # default-suite time budget (the tracked shapes per layer are checked
# by the recomputation test's scanned stack)
def test_tracked_figures_of_a_scanned_stack_equal_separate_layers():
    stack = {"s": _params()["s"]}
    layers = {f"s{i}": stack["s"][i] for i in range(3)}
    o1 = psgd_eqx.kron(1e-2, scanned_layers={"s": True}, track_diagnostics=True)
    o2 = psgd_eqx.kron(1e-2, track_diagnostics=True)
    s1, s2 = o1.init(stack), o2.init(layers)
    step1, step2 = jax.jit(o1.update), jax.jit(o2.update)
    for i in range(2):
        # layer 0's gradient is 100× the others': a stack-wide figure would show it
        g = jax.random.normal(jax.random.PRNGKey(10 + i), (3, 6, 5))
        g = g * jnp.array([100.0, 1.0, 1.0])[:, None, None]
        _, s1 = step1({"s": g}, s1, stack)
        _, s2 = step2({f"s{j}": g[j] for j in range(3)}, s2, layers)
    d1, d2 = psgd_eqx.diagnostics(s1), psgd_eqx.diagnostics(s2)
    for field in ("update_rms", "fit_residual", "clipped"):
        stacked = getattr(d1["['s']"], field)
        separate = jnp.stack([getattr(d2[f"['s{j}']"], field) for j in range(3)])
        # not bit-equal: a stack's layers draw their norm-bound probes from other keys
        np.testing.assert_allclose(stacked, separate, rtol=1e-3, atol=1e-3)


def test_non_finite_step_keeps_the_last_figures():
    params = _params()
    opt = psgd_eqx.kron(1e-2, scanned_layers=SCANNED, track_diagnostics=True)
    state = opt.init(params)
    _, state = opt.update(_grads(params, jax.random.PRNGKey(1)), state, params)
    before = psgd_eqx.diagnostics(state)
    bad = _grads(params, jax.random.PRNGKey(2))
    bad["w"] = bad["w"].at[0, 0].set(jnp.nan)
    _, state = opt.update(bad, state, params)
    after = psgd_eqx.diagnostics(state)
    assert tree_finite(state)
    for name in before:
        for field in ("update_rms", "fit_residual", "clipped"):
            np.testing.assert_array_equal(getattr(after[name], field),
                                          getattr(before[name], field))


@pytest.mark.slow  # eight optimizers to build: default-suite time budget
def test_every_structure_reports_and_runs_under_jit():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 5)), "b": jnp.ones(5)}
    g = jax.tree.map(lambda p: 0.1 * jnp.cos(p), params)
    optimizers = {
        "kron": psgd_eqx.kron(1e-2, track_diagnostics=True),
        "blocked": psgd_eqx.kron(1e-2, track_diagnostics=True, max_size_triangular=4,
                                 partition_grads_into_blocks=True, block_size=3,
                                 max_skew_triangular=math.inf),
        "lra": psgd_eqx.lra(1e-2, rank=2, track_diagnostics=True, per_leaf=True),
        "xmat": psgd_eqx.xmat(1e-2, track_diagnostics=True, per_leaf=True),
        "dense": psgd_eqx.dense(1e-2, track_diagnostics=True, per_leaf=True),
        "diag": psgd_eqx.diag(1e-2, track_diagnostics=True),
        "affine": psgd_eqx.affine(1e-2, track_diagnostics=True),
        "global": psgd_eqx.xmat(1e-2, track_diagnostics=True),  # one over all leaves
    }
    for name, opt in optimizers.items():
        state = opt.init(params)
        # one refit (compiled updates are slow to build: two structures are enough to see
        # the tracked figures; the factors of every structure are read either way)
        refits = name in ("lra", "global")
        if refits:
            _, state = jax.jit(opt.update)(g, state, params)
        report = jax.jit(psgd_eqx.diagnostics)(state)
        assert set(report) == {"['w']", "['b']"}, name
        for leaf in report.values():
            assert leaf.lipschitz and len(leaf.lipschitz) == len(leaf.factor_names), name
            # L ≥ 0 (0 before the first refit; LRA fits U or V on alternate refits)
            assert all(bool(jnp.all(jnp.isfinite(x) & (x >= 0))) for x in leaf.lipschitz)
            assert not refits or any(bool(jnp.all(x > 0)) for x in leaf.lipschitz), name
            # conditioning: ≥ 1 where defined (LRA's U and V have none: NaN)
            for c, n in zip(leaf.conditioning, leaf.factor_names):
                assert (n in ("U", "V")) == bool(jnp.all(jnp.isnan(c))), (name, n)
                assert bool(jnp.all(jnp.isnan(c) | (c >= 1.0))), (name, n)
            assert bool(jnp.isfinite(leaf.fit_residual)), name
            assert bool(leaf.update_rms > 0) == refits, name
    blocked = psgd_eqx.diagnostics(optimizers["blocked"].init(params))["['w']"]
    assert all(n.startswith("block shape") for n in blocked.factor_names)


def test_diagnostics_finds_the_state_in_a_chain_and_rejects_others():
    params = _params()
    chain = optax.chain(optax.clip(1.0), psgd_eqx.kron(1e-2))
    assert set(psgd_eqx.diagnostics(chain.init(params))) == {"['w']", "['b']", "['s']"}
    with pytest.raises(ValueError, match="exactly one `PSGDState`"):
        psgd_eqx.diagnostics(optax.adam(1e-3).init(params))


def test_partition_specs_cover_the_new_fields():
    params = _params()
    specs = psgd_eqx.get_opt_state_partition_specs(
        params, scanned_layers=SCANNED, track_diagnostics=True,
        preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule())
    (st,) = [x for x in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
        x, psgd_eqx.PSGDState)) if isinstance(x, psgd_eqx.PSGDState)]
    assert st.diagnostics is not None and st.staleness is not None


def test_plot_diagnostics(tmp_path):
    params = _params()
    opt = psgd_eqx.kron(1e-2, scanned_layers=SCANNED, track_diagnostics=True)
    state, snaps = opt.init(params), []
    for i in range(4):
        _, state = opt.update(_grads(params, jax.random.PRNGKey(i)), state, params)
        snaps.append(psgd_eqx.diagnostics(state))
    out = tmp_path / "diag.png"
    fig = psgd_eqx.plot_diagnostics(snaps, steps=[1, 2, 3, 4], out=str(out), max_paths=2)
    assert out.exists() and out.stat().st_size > 0
    assert len(fig.axes) == 4
    labelled = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert len(labelled) == 2
    untracked = psgd_eqx.kron(1e-2, scanned_layers=SCANNED)
    fig = psgd_eqx.plot_diagnostics([psgd_eqx.diagnostics(untracked.init(params))])
    assert len(fig.axes) == 2  # L and conditioning only
    with pytest.raises(ValueError, match="at least one snapshot"):
        psgd_eqx.plot_diagnostics([])
    with pytest.raises(ValueError, match="2 entries for 4 snapshots"):
        psgd_eqx.plot_diagnostics(snaps, steps=[0, 1])
