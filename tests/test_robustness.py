"""Robustness: checkpoints, non-finite and extreme gradients, invalid hyperparameters, vmap.

The contract for bad gradients is the one of docs/guides/robustness.md: on a NaN/Inf
gradient the PSGD state stays finite (momentum kept, refit skipped, counter and key
advance), the returned update is non-finite on the bad leaves only, and
`optax.apply_if_finite` skips the whole step. Jitted steps are built once per optimizer
configuration and shared between tests, because compilation dominates the runtime.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import psgd_eqx
from psgd_eqx import KronQ, PSGDState
from psgd_eqx._init_scale import init_scale_from_grads

from .helpers import spd, tree_finite


# -- helpers ---------------------------------------------------------------------------


def _is_state(x) -> bool:
    return isinstance(x, PSGDState)


def _psgd_state(opt_state) -> PSGDState:
    (state,) = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
    return state


def _problem(seed: int):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        spd(k1, 8, 30.0),
        spd(k2, 4, 30.0),
        jax.random.normal(k3, (8, 4), jnp.float32),
        jax.random.normal(k4, (4,), jnp.float32),
    )


_DIAG = jnp.array([1.0, 3.0, 10.0, 30.0], jnp.float32)


def _loss(params, a, b, w_target, b_target):
    e = params["w"] - w_target
    return 0.5 * jnp.sum(e * (a @ e @ b)) + 0.5 * jnp.sum(_DIAG * (params["b"] - b_target) ** 2)


def _params0():
    return {"w": jnp.zeros((8, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}


_grad = jax.jit(jax.grad(_loss))
_loss_jit = jax.jit(_loss)
_LR = 0.03
_STEPPERS = {}


def _stepper(**kwargs):
    """(opt, jitted (params, state, grads) -> (params, state, updates)), one per config."""
    key = tuple(sorted(kwargs.items()))
    if key not in _STEPPERS:
        opt = psgd_eqx.kron(_LR, **kwargs)

        @jax.jit
        def apply(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        _STEPPERS[key] = (opt, apply)
    return _STEPPERS[key]


def _run(apply, params, state, prob, steps: int):
    for _ in range(steps):
        params, state, _ = apply(params, state, _grad(params, *prob))
    return params, state


# -- checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"geometry": "EQ"}, {"cache_preconditioner": True, "max_skew_triangular": math.inf}],
    ids=["PRO", "EQ", "cache"],
)
def test_serialise_midrun_gives_identical_continuation(tmp_path, kwargs):
    opt, apply = _stepper(**kwargs)
    prob = _problem(0)
    p0 = _params0()
    params, state = _run(apply, p0, opt.init(p0), prob, 5)

    path = tmp_path / "checkpoint.eqx"
    eqx.tree_serialise_leaves(path, (params, state))
    template = (jax.tree.map(jnp.zeros_like, p0), opt.init(p0))
    params_r, state_r = eqx.tree_deserialise_leaves(path, template)
    assert eqx.tree_equal((params_r, state_r), (params, state), typematch=True)
    assert int(_psgd_state(state_r).count) == 5
    if kwargs.get("cache_preconditioner"):
        q = _psgd_state(state_r).preconditioners()["w"]
        assert q.cache is not None and all(c is not None for c in q.cache)

    params_a, state_a = _run(apply, params, state, prob, 5)
    params_b, state_b = _run(apply, params_r, state_r, prob, 5)
    assert eqx.tree_equal((params_a, state_a), (params_b, state_b), typematch=True)
    assert int(_psgd_state(state_b).count) == 10
    assert not eqx.tree_equal(params_a, params)
    assert not eqx.tree_equal(_psgd_state(state_a).preconditioners(),
                              _psgd_state(state).preconditioners())


# -- non-finite and extreme gradients ----------------------------------------------------

_BAD = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "zero": 0.0, "huge": 1e30}


def _warm_start():
    """Three normal steps of the default optimizer on problem 1."""
    opt, apply = _stepper()
    prob = _problem(1)
    p0 = _params0()
    params, state = _run(apply, p0, opt.init(p0), prob, 3)
    return prob, params, state


@pytest.mark.parametrize("which", ["all", "one"])
@pytest.mark.parametrize("bad", list(_BAD))
def test_bad_gradient_mid_run(bad, which):
    _, apply = _stepper()
    prob, params, state = _warm_start()
    value = _BAD[bad]
    g = _grad(params, *prob)
    g_bad = {
        "w": jnp.full_like(g["w"], value),
        "b": g["b"] if which == "one" else jnp.full_like(g["b"], value),
    }
    new_params, new_state, updates = apply(params, state, g_bad)
    st0, st1 = _psgd_state(state), _psgd_state(new_state)
    assert tree_finite((st1.mu, st1.preconditioners()))
    assert int(st1.count) == int(st0.count) + 1
    assert not eqx.tree_equal(st1.key, st0.key)

    if math.isfinite(value):
        assert tree_finite(updates)
        # the clips bound every update: RMS ≤ 2 and |u| ≤ 10, times the lr
        for u in jax.tree.leaves(updates):
            assert float(jnp.max(jnp.abs(u))) <= 10 * _LR * (1 + 1e-5)
            assert float(jnp.sqrt(jnp.mean(u * u))) <= 2 * _LR * (1 + 1e-5)
        assert int(st1.refits) == int(st0.refits) + 1
    else:
        # refit skipped: Q, L and the momentum unchanged; the refit counter not reset
        assert eqx.tree_equal(st1.preconditioners(), st0.preconditioners())
        assert eqx.tree_equal(st1.mu, st0.mu)
        assert int(st1.refits) == int(st0.refits)
        # the schedule's accumulated probability is kept, so the next finite step refits
        assert float(st1.refit_accumulator) >= float(st0.refit_accumulator)
        # the update stays finite on the finite leaves (and is NaN on a NaN leaf)
        if which == "one":
            assert tree_finite(updates["b"])
        if bad == "nan":
            assert not bool(jnp.all(jnp.isfinite(updates["w"])))
        new_params = params  # skip the step, as optax.apply_if_finite would

    # normal training goes on with a finite state; the next finite step refits again
    loss_at = float(_loss_jit(new_params, *prob))
    params, state = new_params, new_state
    for i in range(40):
        params, state, _ = apply(params, state, _grad(params, *prob))
        if i == 0:
            assert int(_psgd_state(state).refits) == int(st1.refits) + 1
    assert tree_finite((params, state))
    if bad != "huge":
        # (a 1e30 gradient leaves 1e29 in the momentum for hundreds of steps: no claim)
        assert float(_loss_jit(params, *prob)) < loss_at


def test_zero_gradient_at_first_step():
    opt, apply = _stepper()
    prob = _problem(2)
    p0 = _params0()
    zeros = jax.tree.map(jnp.zeros_like, p0)
    assert float(init_scale_from_grads(zeros)) == 1.0
    params, state, updates = apply(p0, opt.init(p0), zeros)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    st = _psgd_state(state)
    assert tree_finite(state)
    # the init scale fell back to 1: Q is still of order one after one refit step
    for q in jax.tree.leaves(st.preconditioners(), is_leaf=lambda x: isinstance(x, KronQ)):
        for f in q.factors:
            assert 0.5 < float(jnp.max(jnp.abs(f))) < 2.0
    loss0 = float(_loss_jit(params, *prob))
    params, state = _run(apply, params, state, prob, 100)
    assert tree_finite((params, state))
    assert float(_loss_jit(params, *prob)) < loss0 / 10


def test_apply_if_finite_skips_the_bad_step():
    opt = optax.apply_if_finite(psgd_eqx.kron(_LR), max_consecutive_errors=5)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    prob = _problem(3)
    params = _params0()
    state = opt.init(params)
    for _ in range(2):
        params, state = step(params, state, _grad(params, *prob))
    g = _grad(params, *prob)
    g_nan = {"w": g["w"].at[0, 0].set(jnp.nan), "b": g["b"]}
    params_1, state_1 = step(params, state, g_nan)
    assert eqx.tree_equal(params_1, params)
    assert eqx.tree_equal(state_1.inner_state, state.inner_state)
    assert int(state_1.notfinite_count) == 1 and int(state_1.total_notfinite) == 1
    params_2, state_2 = step(params_1, state_1, g)
    assert not eqx.tree_equal(params_2, params_1)
    assert tree_finite((params_2, state_2))
    assert int(state_2.notfinite_count) == 0
    assert int(_psgd_state(state_2.inner_state).count) == 3


# -- invalid hyperparameters -------------------------------------------------------------

_INVALID = [
    ({"b1": 1.5}, "b1"),
    ({"b1": -0.1}, "b1"),
    ({"preconditioner_lr": 0}, "preconditioner_lr"),
    ({"preconditioner_lr": -1}, "preconditioner_lr"),
    ({"preconditioner_update_probability": 0}, "preconditioner_update_probability"),
    ({"preconditioner_update_probability": 1.5}, "preconditioner_update_probability"),
    ({"geometry": "XYZ"}, "geometry"),
    ({"memory_save_mode": "bogus"}, "memory_save_mode"),
    ({"max_size_triangular": -1}, "max_size_triangular"),
    ({"min_ndim_triangular": -1}, "min_ndim_triangular"),
    ({"max_skew_triangular": -1}, "max_skew_triangular"),
    ({"weight_decay": -1}, "weight_decay"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"grad_clip_max_amp": 0}, "grad_clip_max_amp"),
    ({"preconditioner_init_scale": 0}, "preconditioner_init_scale"),
    ({"lipschitz_beta": 1.0}, "lipschitz_beta"),
    ({"norm_bound": "bogus"}, "norm_bound"),
    ({"norm_bound_k": 0}, "norm_bound_k"),
    ({"whiten_grad": False, "b1": 0.0}, "whiten_grad"),
    ({"whiten_grad": True, "momentum_into_precond_update": True}, "momentum_into_precond_update"),
]


@pytest.mark.parametrize(
    "kwargs,name", _INVALID, ids=["-".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in _INVALID]
)
def test_invalid_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        psgd_eqx.kron(**kwargs)


@pytest.mark.parametrize(
    "kwargs,name", [({"min_prob": 0}, "min_prob"), ({"max_prob": 2}, "max_prob")]
)
def test_invalid_schedule_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        psgd_eqx.precond_update_prob_schedule(**kwargs)


# -- vmap over stacked preconditioners ---------------------------------------------------


def _fit_and_apply(q, h, g, key):
    q = q.update(None, h, lr=0.5, key=key)
    return q, q.apply(g)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def test_vmap_kronq_apply_and_update():
    n = 3
    qs = jax.vmap(lambda _: KronQ.init((6, 4)))(jnp.arange(n))
    assert qs.factors[0].shape == (n, 6, 6) and qs.lipschitz.shape == (n, 2)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(12), 3)
    scale = jnp.array([1.0, 10.0, 0.1], jnp.float32)[:, None, None]
    hs = jax.random.normal(k1, (2, n, 6, 4), jnp.float32) * scale[None]
    gs = jax.random.normal(k2, (2, n, 6, 4), jnp.float32)
    keys = jax.random.split(k3, 2 * n).reshape(2, n, -1)

    batched = jax.jit(jax.vmap(_fit_and_apply))
    single = jax.jit(_fit_and_apply)
    singles = [_index(qs, i) for i in range(n)]
    for t in range(2):  # two rounds: the second starts from distinct preconditioners
        qs, out = batched(qs, hs[t], gs[t], keys[t])
        for i in range(n):
            singles[i], out_i = single(singles[i], hs[t, i], gs[t, i], keys[t, i])
            assert eqx.tree_equal(_index(qs, i), singles[i], rtol=1e-5, atol=1e-7)
            assert eqx.tree_equal(out[i], out_i, rtol=1e-5, atol=1e-6)
    # fitted to differently scaled data, the three preconditioners differ
    assert not eqx.tree_equal(_index(qs, 0), _index(qs, 1), rtol=1e-2, atol=0.0)
