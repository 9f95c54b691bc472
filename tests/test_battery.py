"""One battery of optax-protocol checks run over every optimizer alias.

For each of `kron`, `psgd` (a structure mixing `KronQ`, `DiagQ`, plain momentum and the
`GLOBAL` group), `lra`, `xmat`, `affine`, `diag` and `dense`: `init`/`update` under
`jax.jit`; `optax.chain` with `clip_by_global_norm`; `optax.inject_hyperparams` (both
`init` and `update` jitted, updates equal to the plain alias's); `optax.MultiSteps`;
`optax.masked`; `optax.apply_if_finite` with a NaN step; `lax.scan` against a Python loop;
no recompilation over 20 steps with refits on half of them; `optax.tree_map_params`; and an
`eqx.tree_serialise_leaves` round trip that reproduces the next update exactly.

Compiling a PSGD step dominates the runtime on CPU, so every optimizer and its jitted
`update` are built once at module level, and the reference trajectory (20 steps of the
plain alias in a Python loop) is computed once per alias and shared by the tests.
"""

import dataclasses
import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx as pe
from psgd_eqx import GLOBAL, DenseQ, DiagQ, KronQ, PSGDState


NAMES = ("kron", "psgd", "lra", "xmat", "affine", "diag", "dense")
LR = 0.02
P_REFIT = 0.5  # refits on about half of the steps: both branches of the refit cond run
STEPS = 20

_F32 = jnp.float32


def _tree(shapes: dict) -> dict:
    return {k: jnp.linspace(-0.5, 0.5, math.prod(s), dtype=_F32).reshape(s)
            for k, s in shapes.items()}


# Tiny params keep the compilations short. `psgd` gets one leaf per kind of structure:
# w -> KronQ, e -> DiagQ, b -> None (plain momentum), g and s -> the GLOBAL group.
_SMALL = _tree({"w": (4, 3), "b": (3,)})
_MIXED = _tree({"w": (4, 3), "b": (3,), "e": (5,), "g": (2, 2), "s": (2,)})
PARAMS = {name: _MIXED if name == "psgd" else _SMALL for name in NAMES}
_KEYS = dict(zip(sorted(_MIXED), jax.random.split(jax.random.PRNGKey(0), len(_MIXED))))
_TARGET = {k: jax.random.normal(_KEYS[k], v.shape, _F32) for k, v in _MIXED.items()}
# per-element curvatures spread over two decades: an ill-conditioned separable quadratic
_CURV = {k: jnp.logspace(0.0, 2.0, v.size, dtype=_F32).reshape(v.shape)
         for k, v in _MIXED.items()}


def loss(params):
    return sum(jnp.sum(_CURV[k] * (params[k] - _TARGET[k]) ** 2) for k in sorted(params))


grad_fn = jax.jit(jax.grad(loss))
loss_fn = jax.jit(loss)


def _structure(path, leaf):
    name = jax.tree_util.keystr(path)
    if name == "['w']":
        return KronQ.init(leaf.shape, leaf.dtype)
    if name == "['e']":
        return DiagQ.init(leaf.shape, leaf.dtype)
    if name == "['b']":
        return None  # plain momentum
    return GLOBAL


def _global_structure(n, dtype):
    return DenseQ.init(n, dtype)


# name -> (factory, arguments that are functions: static for inject_hyperparams)
FACTORIES = {
    "kron": (pe.kron, {}),
    "psgd": (pe.psgd, {"structure": _structure, "global_structure": _global_structure}),
    "lra": (pe.lra, {}),
    "xmat": (pe.xmat, {}),
    "affine": (pe.affine, {}),
    "diag": (pe.diag, {}),
    "dense": (pe.dense, {}),
}


def make(name: str, **kwargs) -> optax.GradientTransformationExtraArgs:
    factory, static = FACTORIES[name]
    return factory(learning_rate=LR, preconditioner_update_probability=P_REFIT,
                   **static, **kwargs)


OPTS = {name: make(name) for name in NAMES}

# One jitted update per alias, shared by every test; traces are counted (the Python body
# of a jitted function runs only when it is traced).
TRACES = dict.fromkeys(NAMES, 0)


def _counting_update(name):
    opt = OPTS[name]

    def update(grads, state, params):
        TRACES[name] += 1
        return opt.update(grads, state, params)

    return jax.jit(update)


_UPDATE = {name: _counting_update(name) for name in NAMES}


# -- helpers -------------------------------------------------------------------------


def _is_state(x) -> bool:
    return isinstance(x, PSGDState)


def psgd_state(opt_state) -> PSGDState:
    states = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]
    assert len(states) == 1, states
    return states[0]


def finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype,
                                                                  jnp.inexact)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def same(a, b) -> bool:
    """Exactly equal trees (structure, dtypes, values)."""
    return bool(eqx.tree_equal(a, b, typematch=True))


def close(a, b, rtol=1e-5, atol=1e-7) -> bool:
    return bool(eqx.tree_equal(a, b, typematch=True, rtol=rtol, atol=atol))


def vdot(a, b) -> float:
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@dataclasses.dataclass
class Trajectory:
    """STEPS steps of the plain alias in a Python loop: params[t], states[t] before step t,
    grads[t] and updates[t] of step t (params/states have STEPS + 1 entries), and the
    jitted update's trace count and cache size right after the loop."""

    params: list
    states: list
    grads: list
    updates: list
    traces: int = 0
    cache_size: int = 0


@ft.cache
def trajectory(name: str) -> Trajectory:
    opt, update, params = OPTS[name], _UPDATE[name], PARAMS[name]
    state = opt.init(params)
    out = Trajectory([params], [state], [], [])
    for _ in range(STEPS):
        g = grad_fn(params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.params.append(params)
        out.states.append(state)
        out.grads.append(g)
        out.updates.append(u)
    # recorded now, before any other test calls the same jitted update
    out.traces, out.cache_size = TRACES[name], update._cache_size()
    return out


def update_fn(name: str):
    """The alias's shared jitted update; the trajectory (which counts its traces) first."""
    trajectory(name)
    return _UPDATE[name]


def some(*default: str):
    """All aliases; those not in `default` marked slow (each of these tests compiles a
    wrapped PSGD step of its own, and a wrapper behaves alike over the aliases: the default
    run covers one per-leaf and one global-group alias, the slow run all of them). The
    per-alias checks of every test run kron, psgd and xmat by default (time budget)."""
    return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


# -- init and update under jit -----------------------------------------------------------


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_init_under_jit_is_pure(name):
    opt, params = OPTS[name], PARAMS[name]
    s1, s2 = opt.init(params), opt.init(params)
    sj = jax.jit(opt.init)(params)
    assert same(s1, s2), "init is not a pure function of the params"
    # equal up to rounding (XLA may fuse a random draw's normalisation differently)
    assert close(sj, s1, rtol=1e-6, atol=1e-7), "jax.jit(init) differs from init"
    st = psgd_state(s1)
    assert int(st.count) == 0 and int(st.refits) == 0
    assert jax.tree.structure(st.mu) == jax.tree.structure(params)


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_update_under_jit(name):
    t, params = trajectory(name), PARAMS[name]
    u0, g0, s1 = t.updates[0], t.grads[0], t.states[1]
    st = psgd_state(s1)
    assert int(st.count) == 1 and int(st.refits) == 1  # the first step always refits
    assert jax.tree.structure(u0) == jax.tree.structure(params)
    for k in params:
        assert u0[k].shape == params[k].shape and u0[k].dtype == params[k].dtype
        assert bool(jnp.any(u0[k] != 0)), k
    assert finite(u0) and finite(s1)
    assert vdot(u0, g0) < 0  # a descent direction
    # 20 steps make progress on the quadratic
    assert float(loss_fn(t.params[-1])) < 0.9 * float(loss_fn(params))
    assert jax.tree.structure(t.states[-1]) == jax.tree.structure(t.states[0])


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_no_recompilation_over_steps(name):
    t = trajectory(name)
    refits = [int(psgd_state(s).refits) for s in t.states]
    did = np.diff(refits)
    # refits happened on some steps and not on others: both branches ran
    assert set(did.tolist()) == {0, 1}, refits
    assert int(psgd_state(t.states[-1]).count) == STEPS
    assert t.traces == 1, f"{t.traces} traces over {STEPS} steps"
    assert t.cache_size == 1


@pytest.mark.parametrize("name", some("kron", "psgd"))
def test_scan_matches_python_loop(name):
    opt, t, params = OPTS[name], trajectory(name), PARAMS[name]

    @jax.jit
    def run(params, state):
        def body(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), length=STEPS)[0]

    p_scan, s_scan = run(params, opt.init(params))
    assert not close(t.params[-1], params, rtol=1e-3, atol=1e-3)
    assert close(p_scan, t.params[-1], rtol=1e-4, atol=1e-6)
    assert close(s_scan, t.states[-1], rtol=1e-4, atol=1e-6)
    for field in ("count", "refits"):
        assert int(getattr(psgd_state(s_scan), field)) == int(getattr(psgd_state(
            t.states[-1]), field))


# -- optax wrappers ----------------------------------------------------------------------


@pytest.mark.parametrize("name", some("diag", "xmat"))
def test_chain_with_clip_by_global_norm(name):
    max_norm, params = 1.0, PARAMS[name]
    chain = optax.chain(optax.clip_by_global_norm(max_norm), OPTS[name])
    g = jax.tree.map(lambda x: 100.0 * x, trajectory(name).grads[0])
    norm = float(optax.tree.norm(g))
    assert norm > 10 * max_norm  # the clip is active
    u, state = jax.jit(chain.update)(g, chain.init(params), params)
    clipped = jax.tree.map(lambda x: x * (max_norm / norm), g)
    u_ref, s_ref = update_fn(name)(clipped, OPTS[name].init(params), params)
    assert close(u, u_ref, rtol=1e-4, atol=1e-7)
    assert close(state[1], s_ref, rtol=1e-4, atol=1e-7)
    assert int(psgd_state(state).count) == 1


def _inject(name):
    factory, static = FACTORIES[name]
    return optax.inject_hyperparams(factory, static_args=tuple(static))(
        learning_rate=LR, preconditioner_update_probability=P_REFIT, **static)


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_inject_hyperparams_jitted_init_and_update(name):
    t, params = trajectory(name), PARAMS[name]
    inj = _inject(name)
    state = jax.jit(inj.init)(params)  # what every sharded training loop does
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(LR, rel=1e-7)
    assert close(psgd_state(state.inner_state), psgd_state(t.states[0]))
    update = jax.jit(inj.update)
    for i in range(3):
        u, state = update(t.grads[i], state, t.params[i])
        assert close(u, t.updates[i], rtol=1e-5, atol=1e-7), i
        assert close(psgd_state(state.inner_state), psgd_state(t.states[i + 1]),
                     rtol=1e-5, atol=1e-6), i
    # the injected learning rate is the one used
    lr = state.hyperparams["learning_rate"]
    half = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr / 2})
    u_full, _ = update(t.grads[3], state, t.params[3])
    u_half, _ = update(t.grads[3], half, t.params[3])
    assert bool(jnp.any(u_full["w"] != 0))
    assert close(u_half, jax.tree.map(lambda x: x / 2, u_full), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name", some("kron", "dense"))
def test_multisteps(name):
    k, params = 3, PARAMS[name]
    ms = optax.MultiSteps(OPTS[name], every_k_schedule=k)
    grads = [grad_fn(jax.tree.map(lambda x, i=i: x + 0.1 * i, params)) for i in range(k)]
    state = ms.init(params)
    update = jax.jit(ms.update)
    outs = []
    # optax.MultiSteps divides its f32 accumulator by an int32 count: it needs standard
    # promotion (optax 0.2.8); the wrapped PSGD update is traced inside the same context.
    with jax.numpy_dtype_promotion("standard"):
        for g in grads:
            u, state = update(g, state, params)
            outs.append((u, int(psgd_state(state.inner_opt_state).count)))
    assert [c for _, c in outs] == [0, 0, 1]
    for u, _ in outs[:-1]:
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
    mean = jax.tree.map(lambda *xs: sum(xs) / k, *grads)
    u_ref, s_ref = update_fn(name)(mean, OPTS[name].init(params), params)
    assert bool(jnp.any(u_ref["w"] != 0))
    assert close(outs[-1][0], u_ref, rtol=1e-4, atol=1e-7)
    assert close(psgd_state(state.inner_opt_state), psgd_state(s_ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", some("psgd", "xmat"))
def test_masked(name):
    params = PARAMS[name]
    mask = {k: k in ("w", "e") for k in params}  # psgd: KronQ and DiagQ leaves only
    masked = optax.masked(OPTS[name], mask)
    sub = {k: v for k, v in params.items() if mask[k]}
    ref = make(name)  # the same alias on the masked-in leaves only

    @jax.jit
    def step(grads, state, ref_state):
        u, state = masked.update(grads, state, params)
        sub_grads = {k: v for k, v in grads.items() if mask[k]}
        u_ref, ref_state = ref.update(sub_grads, ref_state, sub)
        return u, state, u_ref, ref_state

    state, ref_state = masked.init(params), ref.init(sub)
    for i in range(2):
        g = grad_fn(jax.tree.map(lambda x, i=i: x - 0.2 * i, params))
        u, state, u_ref, ref_state = step(g, state, ref_state)
        for k, on in mask.items():
            if on:
                assert bool(jnp.any(u[k] != 0)) and close(u[k], u_ref[k]), (i, k)
            else:  # masked-out leaves pass through untouched
                assert same(u[k], g[k]), (i, k)
    st = psgd_state(state)
    assert int(st.count) == 2
    assert close(st.mu["w"], psgd_state(ref_state).mu["w"])


@pytest.mark.parametrize("name", some("affine", "lra"))
def test_apply_if_finite_skips_a_nan_step(name):
    t, params = trajectory(name), PARAMS[name]
    aif = optax.apply_if_finite(OPTS[name], 2)
    update = jax.jit(aif.update)
    u1, s1 = update(t.grads[0], aif.init(params), params)
    assert close(u1, t.updates[0])
    p1 = t.params[1]
    bad = {**t.grads[1], "w": t.grads[1]["w"].at[1, 2].set(jnp.nan)}
    u2, s2 = update(bad, s1, p1)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u2))
    assert same(optax.apply_updates(p1, u2), p1)  # params unchanged by the NaN step
    assert same(s2.inner_state, s1.inner_state) and finite(s2.inner_state)
    assert int(s2.notfinite_count) == 1 and not bool(s2.last_finite)
    assert int(s2.total_notfinite) == 1
    # the next finite step proceeds as if the NaN step had not happened
    u3, s3 = update(t.grads[1], s2, p1)
    assert close(u3, t.updates[1], rtol=1e-5, atol=1e-7)
    assert close(psgd_state(s3.inner_state), psgd_state(t.states[2]), rtol=1e-5, atol=1e-6)
    assert int(s3.notfinite_count) == 0 and bool(s3.last_finite)


# -- state utilities ---------------------------------------------------------------------


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_tree_map_params(name):
    opt, state, params = OPTS[name], trajectory(name).states[3], PARAMS[name]
    assert same(optax.tree_map_params(opt, lambda v: v, state), state)
    # the params-shaped parts (the momentum) are mapped; the counters and key are not
    mapped = optax.tree_map_params(opt, lambda v: jnp.full_like(v, 7.0), state)
    st, st0 = psgd_state(mapped), psgd_state(state)
    assert jax.tree.structure(st.mu) == jax.tree.structure(params)
    assert all(bool(jnp.all(m == 7.0)) for m in jax.tree.leaves(st.mu))
    assert not bool(jnp.all(st0.mu["w"] == 7.0))
    assert same((st.count, st.refits, st.key), (st0.count, st0.refits, st0.key))


@pytest.mark.parametrize("name", some("kron", "psgd", "xmat"))
def test_serialise_round_trip_reproduces_next_update(name, tmp_path):
    opt, t = OPTS[name], trajectory(name)
    state, params, grads = t.states[3], t.params[3], t.grads[3]
    path = tmp_path / f"{name}.eqx"
    eqx.tree_serialise_leaves(path, state)
    template = opt.init(PARAMS[name])
    restored = eqx.tree_deserialise_leaves(path, template)
    assert same(restored, state)
    assert not same(restored, template)
    update = update_fn(name)
    n = update._cache_size()
    u_a, s_a = update(grads, state, params)
    u_b, s_b = update(grads, restored, params)
    assert same(u_a, u_b) and same(s_a, s_b)
    assert same(u_a, t.updates[3])
    assert update._cache_size() == n  # resuming from a checkpoint does not recompile
