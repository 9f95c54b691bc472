"""The generic optimizer: per-layer structure mixes, the GLOBAL group, the flat aliases
(`per_leaf`), psgd_jax's legacy argument names, and Newton arguments through every alias."""

import io
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx as pe
from psgd_eqx import GLOBAL, LRAQ, AffineQ, DenseQ, DiagQ, KronQ, PSGDState, XMatQ
from psgd_eqx._global import GlobalSlot

from .helpers import tree_finite


# -- helpers ---------------------------------------------------------------------------


def _is_state(x) -> bool:
    return isinstance(x, PSGDState)


def _psgd_state(opt_state) -> PSGDState:
    (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
    return state


def _is_precond(x) -> bool:
    return x is None or isinstance(x, (pe.AbstractPrecond, GlobalSlot))


def _name(path) -> str:
    return jax.tree_util.keystr(path)


# -- a small model with a mixed per-layer structure ---------------------------------------


def _model_params(key):
    ks = jax.random.split(key, 7)
    return {
        "embed": 0.5 * jax.random.normal(ks[0], (10, 4)),  # → DiagQ
        "attn": 0.5 * jax.random.normal(ks[1], (4, 4)),  # → KronQ (both sides dense)
        "head": 0.5 * jax.random.normal(ks[2], (4, 3)),  # → DenseQ over 12 elements
        "bias": jnp.zeros((3,)),  # → None (plain momentum)
        "ln_scale": jnp.ones((4,)),  # → GLOBAL
        "ln_bias": jnp.zeros((4,)),  # → GLOBAL
        "gate": jnp.ones((2, 2)),  # → GLOBAL
    }


def _structure(path, leaf):
    name = _name(path)
    if "embed" in name:
        return DiagQ.init(leaf.shape)
    if "attn" in name:
        return KronQ.init(leaf.shape)
    if "head" in name:
        return DenseQ.init(leaf.shape)
    if "bias" in name and "ln" not in name:
        return None
    return GLOBAL


_GLOBAL_N = 4 + 4 + 4  # ln_scale, ln_bias, gate

_GLOBAL_STRUCTURES = {
    "lra": lambda n, dtype: LRAQ.init(n, dtype, rank=3),
    "xmat": lambda n, dtype: XMatQ.init(n, dtype),
}


def _model(params, ids):
    e = params["embed"][ids]  # (B, 4)
    e = e * params["ln_scale"][None, :] + params["ln_bias"][None, :]
    h = jnp.tanh(e @ params["attn"])
    h = h.reshape(h.shape[0], 2, 2) @ params["gate"]
    return h.reshape(h.shape[0], 4) @ params["head"] + params["bias"][None, :]


def _data():
    k1, k2 = jax.random.split(jax.random.PRNGKey(42))
    ids = jax.random.randint(k1, (64,), 0, 10)
    teacher = _model_params(k2)
    return ids, _model(teacher, ids)


def _loss(params, ids, y):
    return jnp.mean((_model(params, ids) - y) ** 2)


def _train(opt, params, steps: int, newton: bool = False):
    ids, y = _data()

    def step(carry, key):
        params, state = carry
        if newton:
            loss, grad, hvp, vector, upd = pe.hessian_helper(key, _loss, params, (ids, y))
            updates, state = opt.update(grad, state, params, Hvp=hvp, vector=vector,
                                        update_preconditioner=upd)
        else:
            loss, grad = jax.value_and_grad(_loss)(params, ids, y)
            updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def run(params, state):
        keys = jax.random.split(jax.random.PRNGKey(1), steps)
        return jax.lax.scan(step, (params, state), keys)

    return run(params, opt.init(params))


@pytest.mark.parametrize("global_kind", [  # the slowest to compile: in the slow run
    pytest.param(k, marks=pytest.mark.slow) if k == "lra" else k
    for k in sorted(_GLOBAL_STRUCTURES)])
def test_mixed_structure_trains_and_serialises(global_kind):
    params = _model_params(jax.random.PRNGKey(0))
    opt = pe.psgd(3e-2, _structure, global_structure=_GLOBAL_STRUCTURES[global_kind])
    state0 = opt.init(params)
    st = _psgd_state(state0)

    # -- the state's structure
    pc = st.preconditioners()
    assert isinstance(pc["embed"], DiagQ) and pc["embed"].d.shape == (10, 4)
    assert isinstance(pc["attn"], KronQ) and pc["attn"].dense == (True, True)
    assert [f.shape for f in pc["attn"].factors] == [(4, 4), (4, 4)]
    assert isinstance(pc["head"], DenseQ) and pc["head"].q.shape == (12, 12)
    assert pc["bias"] is None  # plain momentum
    for name in ("ln_scale", "ln_bias", "gate"):
        assert isinstance(pc[name], GlobalSlot)  # in the global group: no arrays of its own
    flat_names = [_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert st.global_mask == tuple(n in ("['gate']", "['ln_bias']", "['ln_scale']")
                                   for n in flat_names)
    gq = st.global_precond
    if global_kind == "lra":
        assert isinstance(gq, LRAQ) and gq.u.shape == (_GLOBAL_N, 3) and gq.shape == (_GLOBAL_N,)
    else:
        assert isinstance(gq, XMatQ) and gq.blocks.shape == (_GLOBAL_N // 2, 2, 2)
    assert jax.tree.structure(st.mu) == jax.tree.structure(params)

    # -- it trains under jit
    (params1, state1), losses = _train(opt, params, 150)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and tree_finite(params1)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    st1 = _psgd_state(state1)
    assert int(st1.count) == 150 and int(st1.refits) == 150
    assert jax.tree.structure(state1) == jax.tree.structure(state0)
    # every preconditioner (the global one included) was fitted
    for name in ("embed", "attn", "head"):
        assert not eqx.tree_equal(st1.preconditioners()[name], pc[name])
    assert not eqx.tree_equal(st1.global_precond, gq)

    # -- the fitted state serialises (None leaves, the global group and all)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state1)
    buf.seek(0)
    restored = eqx.tree_deserialise_leaves(buf, opt.init(params))
    assert eqx.tree_equal(restored, state1)
    assert not eqx.tree_equal(restored, state0)


@pytest.mark.slow  # default-suite time budget; the Newton pairs of each structure are
# also covered by tests/test_newton.py
def test_mixed_structure_with_newton_pairs():
    """Hvp and vector are routed to per-leaf and global preconditioners alike."""
    params = _model_params(jax.random.PRNGKey(0))
    opt = pe.psgd(0.3, _structure, global_structure=_GLOBAL_STRUCTURES["lra"])
    (params1, state1), losses = _train(opt, params, 40, newton=True)
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses[[0, -1]]
    st = _psgd_state(state1)
    assert int(st.refits) == 40 and tree_finite(st)


# -- the GLOBAL group: concatenation order and split -------------------------------------


def test_global_group_concatenates_in_flatten_order_and_splits_back():
    """A fixed known P on the global group: the update must be P·concat(g) split back."""
    params = {
        "a": jnp.zeros((2, 3), jnp.float32),  # GLOBAL
        "b": jnp.zeros((4,), jnp.float32),  # DiagQ
        "c": jnp.zeros((3,), jnp.float32),  # GLOBAL
        "d": [jnp.zeros((), jnp.float32), jnp.zeros((1, 2), jnp.float32)],  # GLOBAL, None
        "e": jnp.zeros((2, 1, 2), jnp.float32),  # GLOBAL
    }

    def structure(path, leaf):
        name = _name(path)
        if name == "['b']":
            return DiagQ.init(leaf.shape)
        if name == "['d'][1]":
            return None
        return GLOBAL

    n = 6 + 3 + 1 + 4
    tx = pe.scale_by_psgd(
        structure, global_structure=lambda n, dt: DenseQ.init(n, dt, geometry="PRO"),
        b1=0.0, preconditioner_init_scale=1.0, grad_clip_max_amp=None,
        grad_clip_max_element=None,
    )
    state = tx.init(params)
    assert state.global_precond.shape == (n,)
    assert state.global_mask == (True, False, True, True, False, True)
    m = jax.random.normal(jax.random.PRNGKey(0), (n, n)) / n**0.5 + jnp.eye(n)
    p = m.T @ m  # the known P = QᵀQ
    d = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
    b = state.precond.index.index((1,))  # "b" (leaf 1) is a bucket of its own
    state = eqx.tree_at(lambda s: (s.global_precond.q, s.precond.stacks[b].d), state, (m, d))
    grads = jax.tree.map(
        lambda x, k: jax.random.normal(k, x.shape, x.dtype), params,
        jax.tree.unflatten(jax.tree.structure(params),
                           list(jax.random.split(jax.random.PRNGKey(1), 6))),
    )
    updates, new_state = jax.jit(tx.update)(grads, state, params,
                                            update_preconditioner=jnp.array(False))
    assert eqx.tree_equal(new_state.global_precond, state.global_precond)
    flat = jnp.concatenate([grads["a"].reshape(-1), grads["c"], grads["d"][0].reshape(-1),
                            grads["e"].reshape(-1)])
    want = np.asarray(p @ flat)
    np.testing.assert_allclose(updates["a"], want[:6].reshape(2, 3), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["c"], want[6:9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["d"][0], want[9], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["e"], want[10:].reshape(2, 1, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates["b"], d**2 * grads["b"], rtol=1e-6)  # P = diag(d²)
    np.testing.assert_allclose(updates["d"][1], grads["d"][1], rtol=1e-6)  # None: P = I
    assert all(u.shape == g.shape for u, g in zip(jax.tree.leaves(updates),
                                                  jax.tree.leaves(grads)))


def test_global_group_mixed_dtypes_split_back_to_leaf_dtypes():
    params = {"a": jnp.ones((3,), jnp.float32), "b": jnp.ones((2, 2), jnp.bfloat16)}
    tx = pe.scale_by_psgd(lambda path, leaf: GLOBAL,
                          global_structure=lambda n, dt: DenseQ.init(n, dt), b1=0.0)
    state = tx.init(params)
    assert state.global_precond.q.dtype == jnp.float32  # the group's common dtype
    grads = {"a": jnp.array([1.0, -2.0, 0.5], jnp.float32),
             "b": jnp.array([[0.25, 1.0], [-1.0, 2.0]], jnp.bfloat16)}
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["a"].dtype == jnp.float32 and updates["b"].dtype == jnp.bfloat16
    p = state.global_precond.as_matrix()
    flat = jnp.concatenate([grads["a"], grads["b"].astype(jnp.float32).reshape(-1)])
    want = p @ flat
    want = want * jnp.minimum(1.0, 2.0 / jnp.sqrt(jnp.mean(want**2)))  # RMS clip at 2
    np.testing.assert_allclose(updates["a"], want[:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(updates["b"].astype(jnp.float32), want[3:].reshape(2, 2),
                               rtol=2e-2, atol=1e-2)


# -- flat aliases: per_leaf --------------------------------------------------------------

_SMALL = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.ones((4,), jnp.float32),
          "s": jnp.ones((), jnp.float32)}


@pytest.mark.parametrize(
    "alias,cls",
    [(pe.xmat, XMatQ), pytest.param(pe.lra, LRAQ, marks=pytest.mark.slow), (pe.dense, DenseQ)],
)
def test_per_leaf_state(alias, cls):
    n = 12 + 4 + 1
    glob = _psgd_state(alias(0.01).init(_SMALL))
    assert isinstance(glob.global_precond, cls) and glob.global_precond.shape == (n,)
    assert glob.global_mask == (True, True, True)
    assert all(isinstance(q, GlobalSlot)
               for q in jax.tree.leaves(glob.preconditioners(), is_leaf=_is_precond))
    assert glob.mu is not None

    per = _psgd_state(alias(0.01, per_leaf=True).init(_SMALL))
    assert per.global_precond is None and not any(per.global_mask)
    leaves = per.preconditioners()
    for name, leaf in _SMALL.items():
        assert isinstance(leaves[name], cls) and leaves[name].shape == leaf.shape
    np.testing.assert_allclose(leaves["w"].as_matrix(), jnp.eye(12))
    if cls is LRAQ:  # rank 10 by default, capped at n − 1 per leaf
        assert glob.global_precond.rank == 10
        assert (leaves["w"].rank, leaves["b"].rank, leaves["s"].rank) == (10, 3, 0)
    if cls is DenseQ:
        assert leaves["w"].q.shape == (12, 12) and glob.global_precond.q.shape == (n, n)
    # the per-leaf variant steps under jit (the global one: test_alias_with_newton_args...)
    opt = alias(0.01, per_leaf=True)
    updates, state = jax.jit(opt.update)(_SMALL, opt.init(_SMALL), _SMALL)
    assert tree_finite(updates) and int(_psgd_state(state).refits) == 1
    after = _psgd_state(state).preconditioners()
    assert all(not eqx.tree_equal(after[k], leaves[k]) for k in _SMALL)


def test_affine_and_diag_are_per_leaf():
    st = _psgd_state(pe.affine(0.01).init(_SMALL))
    assert st.global_precond is None
    w = st.preconditioners()["w"]
    assert isinstance(w, AffineQ) and w.kron.shape == (3, 4)
    assert st.preconditioners()["b"].kron.shape == (1, 4)
    st = _psgd_state(pe.diag(0.01).init(_SMALL))
    w = st.preconditioners()["w"]
    assert isinstance(w, DiagQ) and w.d.shape == (3, 4)


def test_alias_geometry_and_dtype_options():
    st = _psgd_state(pe.xmat(0.01, geometry="PRO", per_leaf=True).init(_SMALL))
    assert st.preconditioners()["w"].geometry == "PRO"
    st = _psgd_state(pe.dense(0.01, geometry="Q0.5EQ1.5").init(_SMALL))
    assert st.global_precond.geometry == "PRO"
    st = _psgd_state(pe.dense(0.01, precond_dtype=jnp.bfloat16).init(_SMALL))
    assert st.global_precond.q.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="geometry"):
        pe.xmat(0.01, geometry="XMAT")


# -- psgd_jax's legacy names ---------------------------------------------------------------


def _two_steps(opt, params=_SMALL, grads=None):
    grads = jax.tree.map(lambda x: 0.5 * x, params) if grads is None else grads
    state = opt.init(params)
    step = jax.jit(opt.update)
    u1, state = step(grads, state, params)
    u2, state = step(grads, state, params)
    return (u1, u2), state


def test_legacy_precond_lr_and_init_scale():
    new, _ = _two_steps(pe.xmat(0.01, preconditioner_lr=0.5, preconditioner_init_scale=2.0))
    old, _ = _two_steps(pe.xmat(0.01, precond_lr=0.5, precond_init_scale=2.0))
    default, _ = _two_steps(pe.xmat(0.01))
    assert eqx.tree_equal(new, old)
    assert not eqx.tree_equal(new, default)
    st = _psgd_state(pe.lra(0.01, precond_init_scale=2.0).init(_SMALL))
    np.testing.assert_allclose(st.global_precond.as_matrix(), 4.0 * jnp.eye(17), rtol=1e-6)


def test_legacy_seed():
    st = _psgd_state(pe.dense(0.01, seed=3).init(_SMALL))
    assert eqx.tree_equal(st.key, jax.random.PRNGKey(3))
    st = _psgd_state(pe.dense(0.01, seed=None).init(_SMALL))  # psgd_jax's default
    assert eqx.tree_equal(st.key, jax.random.PRNGKey(42))
    a = pe.lra(0.01, seed=5).init(_SMALL)
    assert eqx.tree_equal(a, pe.lra(0.01, key=5).init(_SMALL))  # LRA's U is drawn from it
    assert not eqx.tree_equal(a, pe.lra(0.01, key=6).init(_SMALL))


def test_legacy_mask():
    """`mask` is the weight-decay mask: with zero gradients only the decay moves params."""
    zeros = jax.tree.map(jnp.zeros_like, _SMALL)
    mask = {"w": True, "b": False, "s": True}
    for alias in (pe.xmat, pe.affine):
        (u, _), _ = _two_steps(alias(0.1, weight_decay=0.5, mask=mask), grads=zeros)
        np.testing.assert_allclose(u["w"], -0.1 * 0.5 * _SMALL["w"], rtol=1e-6)
        np.testing.assert_allclose(u["s"], -0.1 * 0.5 * _SMALL["s"], rtol=1e-6)
        np.testing.assert_allclose(u["b"], 0.0)
    with pytest.raises(ValueError, match="mask"):
        pe.xmat(0.1, mask=mask, weight_decay_mask=mask)


def test_legacy_uvd_rank():
    st = _psgd_state(pe.lra(0.01, uvd_rank_of_approximation=4).init(_SMALL))
    assert st.global_precond.rank == 4
    st = _psgd_state(pe.lra(0.01, uvd_rank_of_approximation=0).init(_SMALL))
    assert st.global_precond.rank == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            pe.lra(0.01, uvd_rank_of_approximation=bad)


def test_legacy_update_global_norm_clip():
    grads = jax.tree.map(lambda x: 100.0 * x, _SMALL)
    # unclipped, the whitened update has norm ≈ 3.4 here (measured): the clip is active
    (u1, u2), _ = _two_steps(pe.dense(1.0, update_global_norm_clip=0.01), grads=grads)
    assert float(optax.tree.norm(u1)) == pytest.approx(0.01, rel=1e-4)
    assert float(optax.tree.norm(u2)) == pytest.approx(0.01, rel=1e-4)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="update_global_norm_clip"):
            pe.dense(1.0, update_global_norm_clip=bad)


@pytest.mark.parametrize(
    "alias,kwargs,match",
    [
        (pe.xmat, dict(step_normalizer_order="1st"), "step_normalizer_order"),
        (pe.lra, dict(step_normalizer_order="1st"), "step_normalizer_order"),
        (pe.affine, dict(nesterov="yes"), "nesterov"),
        (pe.dense, dict(nesterov=1.5), "nesterov"),
        (pe.xmat, dict(precision="highest"), "precision"),
        (pe.xmat, dict(precond_lr=0.1, preconditioner_lr=0.3), "precond_lr"),
        (pe.dense, dict(precond_init_scale=1.0, preconditioner_init_scale=2.0),
         "precond_init_scale"),
        (pe.lra, dict(seed=1, key=1), "seed"),
        (pe.dense, dict(precond_lr=0.0), "preconditioner_lr"),
        (pe.dense, dict(precond_init_scale=-1.0), "preconditioner_init_scale"),
    ],
)
def test_legacy_bad_values_raise(alias, kwargs, match):
    with pytest.raises(ValueError, match=match):
        alias(0.01, **kwargs)


def test_legacy_defaults_accepted():
    # psgd_jax's settings at their defaults are accepted and change nothing: the same
    # initial state and the same traced update as without them.
    grads = jax.tree.map(lambda x: 0.5 * x, _SMALL)
    for alias in (pe.xmat, pe.lra, pe.affine, pe.dense):
        legacy = alias(0.01, step_normalizer_order="2nd", nesterov=False,
                       precision="tensorfloat32")
        plain = alias(0.01)
        s_legacy, s_plain = legacy.init(_SMALL), plain.init(_SMALL)
        assert jax.tree.leaves(s_plain)
        assert eqx.tree_equal(s_legacy, s_plain), alias.__name__
        j_legacy = jax.make_jaxpr(legacy.update)(grads, s_legacy, _SMALL)
        j_plain = jax.make_jaxpr(plain.update)(grads, s_plain, _SMALL)
        assert len(j_plain.eqns) > 10
        assert str(j_legacy) == str(j_plain), alias.__name__


def test_bad_structure_results_raise():
    bad_string = pe.psgd(0.01, lambda path, leaf: "global_group",
                         global_structure=lambda n, dt: DenseQ.init(n, dt))
    with pytest.raises(ValueError, match="global_group"):
        bad_string.init(_SMALL)
    no_global = pe.psgd(0.01, lambda path, leaf: GLOBAL)
    with pytest.raises(ValueError, match="global_structure"):
        no_global.init(_SMALL)
    with pytest.raises(ValueError, match="global_structure"):
        pe.scale_by_psgd(lambda path, leaf: GLOBAL).init(_SMALL)
    not_precond = pe.psgd(0.01, lambda path, leaf: jnp.eye(2))
    with pytest.raises(ValueError, match="AbstractPrecond"):
        not_precond.init(_SMALL)
    # a global_structure without GLOBAL leaves is simply unused
    st = _psgd_state(pe.psgd(0.01, lambda path, leaf: None,
                             global_structure=lambda n, dt: DenseQ.init(n, dt)).init(_SMALL))
    assert st.global_precond is None


# -- every alias with Newton arguments, under jit ---------------------------------------

_ALIASES = {
    "kron": lambda: pe.kron(0.05),
    "psgd": lambda: pe.psgd(0.05, lambda path, leaf: DenseQ.init(leaf.shape)
                            if leaf.ndim == 2 else GLOBAL,
                            global_structure=lambda n, dt: XMatQ.init(n, dt)),
    "xmat": lambda: pe.xmat(0.05),
    "lra": lambda: pe.lra(0.05, rank=2),
    "dense": lambda: pe.dense(0.05),
    "affine": lambda: pe.affine(0.05),
    "diag": lambda: pe.diag(0.05),
}

_NEWTON_PARAMS = {"w": jnp.full((3, 4), 0.5, jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
_W_TARGET = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)
_SCALES = jnp.logspace(0.0, 1.0, 4, dtype=jnp.float32)


def _newton_loss(params):
    e = params["w"] - _W_TARGET
    return jnp.sum(_SCALES[None, :] * e * e) + jnp.sum(jnp.cosh(params["b"] - 0.5))


@pytest.mark.parametrize("name", [  # affine and lra: in the slow run (time budget)
    pytest.param(n, marks=pytest.mark.slow) if n in ("affine", "lra") else n
    for n in sorted(_ALIASES)])
def test_alias_with_newton_args_under_jit(name):
    opt = _ALIASES[name]()
    steps = 30

    def step(carry, inputs):
        params, state = carry
        key, i = inputs
        loss, grad, hvp, vector, upd = pe.hessian_helper(
            key, _newton_loss, params, preconditioner_update_probability=0.5, train_step=i
        )
        updates, state = opt.update(grad, state, params, Hvp=hvp, vector=vector,
                                    update_preconditioner=upd)
        return (optax.apply_updates(params, updates), state), (loss, upd)

    @jax.jit
    def run(params):
        keys = jax.random.split(jax.random.PRNGKey(0), steps)
        return jax.lax.scan(step, (params, opt.init(params)), (keys, jnp.arange(steps)))

    (params, state), (losses, upds) = run(_NEWTON_PARAMS)
    losses = np.asarray(losses)
    st = _psgd_state(state)
    assert np.all(np.isfinite(losses)) and tree_finite(params) and tree_finite(st)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    # refits follow the helper's draws (steps 0 and 1 always refit), not the schedule
    assert bool(upds[0]) and bool(upds[1])
    assert int(st.refits) == int(np.sum(np.asarray(upds))) < steps
    assert int(st.count) == steps
    assert math.isfinite(float(losses[-1]))


def test_dense_refuses_oversized_q():
    """`dense` raises at init instead of allocating an n×n Q past `max_size`."""
    params = {"w": jnp.ones((30, 20), jnp.float32)}
    with pytest.raises(ValueError, match="max_size"):
        pe.dense(max_size=500).init(params)
    state = pe.dense(max_size=600).init(params)
    assert jax.tree.leaves(state)  # built
    with pytest.raises(ValueError, match="max_size"):
        pe.dense(max_size=0)


@pytest.mark.parametrize("name", ["kron", "diag", "xmat", "lra", "dense",
                                  pytest.param("affine", marks=pytest.mark.slow)])
def test_odd_leaves_scalar_unit_and_empty(name):
    """Scalars, size-1 axes and empty leaves, through every alias with both fits."""
    params = {
        "s": jnp.array(1.0, jnp.float32),
        "m": jnp.ones((1, 5), jnp.float32),
        "t": jnp.ones((2, 1, 3), jnp.float32),
        "e": jnp.ones((0, 3), jnp.float32),
    }

    def loss(p):
        return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))

    opt = getattr(pe, name)(0.1)
    state = opt.init(params)
    assert jax.tree.leaves(state)

    @jax.jit
    def step(p, state, key):
        value, g, hvp, vec, upd = pe.hessian_helper(key, loss, p)
        u, state = opt.update(g, state, p, Hvp=hvp, vector=vec, update_preconditioner=upd)
        p = optax.apply_updates(p, u)
        u, state = opt.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, u), state, value

    p = params
    values = []
    for i in range(4):
        p, state, value = step(p, state, jax.random.PRNGKey(i))
        values.append(float(value))
    assert p["e"].shape == (0, 3)
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0]


@pytest.mark.parametrize("per_leaf", [False, True])
def test_two_inits_of_one_lra_optimizer_are_identical(per_leaf):
    params = {"a": jnp.ones((5, 3)), "b": jnp.ones((7,))}
    opt = pe.lra(1e-2, rank=2, per_leaf=per_leaf)
    first, second = opt.init(params), opt.init(params)
    assert bool(eqx.tree_equal(first, second))
    us = [x.u for x in jax.tree.leaves(_psgd_state(first),
                                       is_leaf=lambda x: isinstance(x, LRAQ))
          if isinstance(x, LRAQ)]
    assert all(float(jnp.abs(u).max()) > 0 for u in us)  # U is drawn, not zero
    if per_leaf:  # different leaves draw different U
        assert not jnp.allclose(us[0].reshape(-1)[:4], us[1].reshape(-1)[:4])
