"""Partition specs for the optimizer state, and sharded training on 8 simulated CPU devices."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

import psgd_eqx
from psgd_eqx import _sharding


WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


def _is_p(x):
    return isinstance(x, P)


def _mesh(sizes, names):
    return AbstractMesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names))


def test_spec_tree_matches_the_state():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,)), "s": jnp.zeros((4, 16, 8))}
    kw = dict(learning_rate=1e-3, scanned_layers={"w": False, "b": False, "s": True},
              params_partition_specs={"w": P("fsdp", None), "b": P(), "s": P(None, "fsdp")})
    specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    shapes = jax.eval_shape(psgd_eqx.kron(**kw).init, params)
    assert jax.tree.structure(specs, is_leaf=_is_p) == jax.tree.structure(shapes)
    st = specs[0]
    # the momentum follows the params (specs normalised: trailing Nones dropped)
    assert st.mu == {"w": P("fsdp"), "b": P(), "s": P(None, "fsdp")}
    w = st.preconditioners()["w"]
    assert w.factors[0] == P("fsdp")  # rows like the sharded axis
    assert w.factors[1] == P("fsdp")  # the unsharded side is spread too (32 % 8 == 0)
    assert w.lipschitz == P()
    s = st.preconditioners()["s"]  # stacked: (4, 16, 16) and (4, 8, 8)
    assert s.inner.factors[0] == P(None, "fsdp")
    assert st.count == P() and st.key == P()


def test_divisibility_and_no_mesh():
    params = {"w": jnp.zeros((64, 12))}
    kw = dict(params_partition_specs={"w": P("fsdp", None)})
    with_mesh = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    assert with_mesh[0].preconditioners()["w"].factors == (P("fsdp"), P())  # 12 % 8 != 0
    without = psgd_eqx.get_opt_state_partition_specs(params, **kw)
    assert without[0].preconditioners()["w"].factors == (P("fsdp"), P())  # no sizes: no spreading
    small = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([128], ["fsdp"]), **kw)
    assert small[0].preconditioners()["w"].factors == (P(), P())  # 64 % 128 != 0: replicated


def test_preconditioner_partition_spec_and_scale_by_kron_only():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    kw = dict(learning_rate=1e-3, weight_decay=0.1,
              params_partition_specs={"w": P("fsdp", "tp"), "b": P("tp")},
              preconditioner_partition_spec=P("tp", "fsdp"), max_skew_triangular=math.inf)
    mesh = _mesh([4, 2], ["fsdp", "tp"])
    specs = psgd_eqx.get_opt_state_partition_specs(params, True, mesh=mesh, **kw)
    assert isinstance(specs, psgd_eqx.PSGDState)
    assert specs.preconditioners()["w"].factors == (P("tp", "fsdp"), P("tp", "fsdp"))
    assert specs.preconditioners()["b"].factors == (P("tp"),)  # diagonal: like its axis


def test_blocked_stack_is_sharded_like_the_cut_axis():
    params = {"emb": jnp.zeros((1024, 64))}
    kw = dict(params_partition_specs={"emb": P("fsdp", None)},
              partition_grads_into_blocks=True, max_size_triangular=512, block_size=128,
              max_skew_triangular=math.inf)
    specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    q = specs[0].preconditioners()["emb"]
    assert isinstance(q, psgd_eqx.BlockedQ)
    # 8 blocks of (128, 64): the block axis takes "fsdp", the 64×64 factor cannot reuse it
    assert q.groups[0].factors == (P("fsdp"), P("fsdp"))


class _Stub(psgd_eqx.AbstractPrecond):
    """Trivial methods, so that the test structures below only declare fields."""

    _guards_finite: ClassVar[bool] = False

    def apply(self, g):
        return g

    def _fit(self, v, h, **kwargs):
        return self

    @property
    def needs_v(self):
        return False

    def rescale(self, scale):
        return self

    def as_matrix(self):
        raise NotImplementedError


class _ScaledDiag(_Stub):  # not registered, flat
    d: jax.Array
    mat: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)


class _Wrapper(_Stub):  # not registered, wraps another structure
    inner: psgd_eqx.AbstractPrecond
    shape: tuple[int, ...] = eqx.field(static=True)


class _KronWithExtra(psgd_eqx.KronQ):
    extra: Any = None


class _StateWithExtra(psgd_eqx.PSGDState):
    extra: Any = None


def _fields(module) -> dict:
    return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)}


def test_rule_tables_name_every_field():
    # a field added to a structure (or the state) without a rule shows up here first
    tables = {psgd_eqx.KronQ: _sharding.KRON_RULES, psgd_eqx.StackedQ: _sharding.STACKED_RULES,
              psgd_eqx.BlockedQ: _sharding.BLOCKED_RULES, psgd_eqx.AffineQ: _sharding.AFFINE_RULES,
              psgd_eqx.PSGDState: _sharding.STATE_RULES, **_sharding.FLAT_RULES}
    for cls, rules in tables.items():
        dynamic = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("static")}
        assert set(rules) == dynamic, cls


def test_extra_field_of_a_registered_structure_is_an_error():
    base = psgd_eqx.KronQ.init((8, 4))
    for extra in (jnp.zeros((8,)), None):  # the error does not depend on the value
        q = _KronWithExtra(**_fields(base), extra=extra)
        with pytest.raises(TypeError, match=r"\['extra'\] of `_KronWithExtra`"):
            psgd_eqx.precond_partition_specs(q, (8, 4), P("fsdp"))
    # inside a stack too: the dispatch recurses into the inner structure's own table
    stacked = psgd_eqx.StackedQ(inner=jax.vmap(lambda _: _KronWithExtra(
        **_fields(base), extra=jnp.zeros((8,))))(jnp.arange(3)), shape=(3, 8, 4))
    with pytest.raises(TypeError, match="_KronWithExtra"):
        psgd_eqx.precond_partition_specs(stacked, (3, 8, 4), P(None, "fsdp"))


def test_extra_field_of_the_state_is_an_error():
    params = {"w": jnp.zeros((8, 4))}
    specs = {"w": P("fsdp")}
    state = jax.eval_shape(psgd_eqx.kron().init, params)
    st = _StateWithExtra(**_fields(state[0]), extra=jax.ShapeDtypeStruct((8, 4), jnp.float32))
    with pytest.raises(TypeError, match=r"\['extra'\] of `_StateWithExtra`"):
        psgd_eqx.state_partition_specs((st, *state[1:]), params, specs)
    # the state itself: every field by name, nothing left over
    out = psgd_eqx.state_partition_specs(state, params, specs)
    assert jax.tree.structure(out, is_leaf=_is_p) == jax.tree.structure(state)


def test_unregistered_flat_structure_gets_the_generic_rule():
    q = _ScaledDiag(d=jnp.ones((8, 4)), mat=jnp.eye(8), scale=jnp.ones(()), shape=(8, 4))
    mesh = _mesh([4, 2], ["fsdp", "tp"])
    out = psgd_eqx.precond_partition_specs(q, (8, 4), P("fsdp", "tp"), mesh=mesh)
    assert type(out) is _ScaledDiag and out.shape == (8, 4)
    assert (out.d, out.mat, out.scale) == (P("fsdp", "tp"), P(), P())
    out = psgd_eqx.precond_partition_specs(q, (8, 4), P("fsdp", "tp"), mesh=mesh,
                                           preconditioner_partition_spec=P("tp", "fsdp"))
    assert out.mat == P("tp", "fsdp")


def test_unregistered_wrapper_is_an_error():
    inner = psgd_eqx.KronQ.init((8, 4))
    with pytest.raises(TypeError, match=r"`_Wrapper` wraps .*\['inner'\]"):
        psgd_eqx.precond_partition_specs(_Wrapper(inner=inner, shape=(8, 4)), (8, 4), P())


def test_a_registered_structure_gets_its_own_rule():
    class RowScale(_Stub):
        rows: jax.Array  # one scale per row of the parameter
        lip: jax.Array
        shape: tuple[int, ...] = eqx.field(static=True)

    def rows_like_axis_0(value, q, ctx):
        return ctx.spec(value.shape, [*ctx.batch, ctx.entries[ctx.offset]])

    rules = {"rows": rows_like_axis_0, "lip": lambda value, q, ctx: P()}
    _sharding.partition_spec_rule.register(
        RowScale, lambda q, ctx: _sharding.specs_by_field(q, rules, ctx)
    )
    q = RowScale(rows=jnp.ones((8,)), lip=jnp.ones(()), shape=(8, 4))
    out = psgd_eqx.precond_partition_specs(q, (8, 4), P("fsdp", "tp"))
    assert type(out) is RowScale and (out.rows, out.lip) == (P("fsdp"), P())
    # wrapped in a stack: the dispatch reaches the new rule with the layer axis prepended
    stacked = psgd_eqx.StackedQ(
        inner=RowScale(rows=jnp.ones((3, 8)), lip=jnp.ones((3,)), shape=(8, 4)),
        shape=(3, 8, 4),
    )
    out = psgd_eqx.precond_partition_specs(stacked, (3, 8, 4), P("layers", "fsdp"))
    assert (out.inner.rows, out.inner.lip) == (P("layers", "fsdp"), P())

    # a rule that returns the wrong number of specs is caught, not passed on shifted
    rules["rows"] = lambda value, q, ctx: (P(), P())
    with pytest.raises(TypeError, match="do not match its structure"):
        psgd_eqx.precond_partition_specs(q, (8, 4), P())


def test_global_group_is_replicated():
    # every leaf in one global X-matrix: its entries in `precond` hold no arrays
    params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}
    state = jax.eval_shape(psgd_eqx.xmat().init, params)
    specs = psgd_eqx.state_partition_specs(state, params, {"w": P("fsdp"), "b": P()},
                                           mesh=_mesh([8], ["fsdp"]))
    assert jax.tree.structure(specs, is_leaf=_is_p) == jax.tree.structure(state)
    assert specs[0].mu == {"w": P("fsdp"), "b": P()}
    assert all(s == P() for s in jax.tree.leaves(specs[0].global_precond, is_leaf=_is_p))


def test_scalar_param_gets_a_replicated_factor():
    # a scalar's 1×1 factor covers no parameter axis (this used to raise an IndexError)
    params = {"s": jnp.zeros(()), "w": jnp.zeros((16, 8))}
    kw = dict(params_partition_specs={"s": P(), "w": P("fsdp")})
    specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    assert specs[0].preconditioners()["s"].factors == (P(),)
    assert specs[0].preconditioners()["w"].factors == (P("fsdp"), P("fsdp"))


def _worker(*parts: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.pop("JAX_PLATFORMS", None)
    res = subprocess.run(
        [sys.executable, str(WORKER), *parts], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multi_device():
    return _worker("fsdp", "memory")


@pytest.fixture(scope="module")
def multi_device_tp():  # the FSDP × TP mesh: another compile of the sharded step (slow)
    return _worker("fsdp_tp")


_MESHES = ["fsdp", pytest.param("fsdp_tp", marks=pytest.mark.slow)]


def _result(request, mesh: str) -> dict:
    fixture = "multi_device" if mesh == "fsdp" else "multi_device_tp"
    return request.getfixturevalue(fixture)


@pytest.mark.parametrize("mesh", _MESHES)
def test_sharded_step_matches_single_device(request, mesh):
    out = _result(request, mesh)
    assert out["devices"] == 8
    r = out[mesh]
    assert r["params_rel_diff"] < 1e-5, r
    assert r["state_rel_diff"] < 1e-4, r


@pytest.mark.parametrize("mesh", _MESHES)
def test_no_large_factor_is_replicated(request, mesh):
    r = _result(request, mesh)[mesh]
    assert r["large_factors"] > 0
    assert r["replicated_large_factors"] == [], r


def test_state_memory_per_device_falls_linearly(multi_device):
    mem = {int(k): v for k, v in multi_device["memory"].items()}
    assert mem[1]["per_device"] == mem[1]["total"]
    for n in (2, 4, 8):
        assert mem[n]["total"] == mem[1]["total"]
        # ≈ linear: at most 10% above total / n (replicated scalars and Lipschitz state)
        assert mem[n]["per_device"] <= 1.1 * mem[1]["total"] / n, (n, mem)


def test_explicit_mesh_update_runs_and_keeps_shardings():
    """`jax.make_mesh`'s default axes are `Explicit`: both sharding modes run under such a
    mesh, give the numbers of the unsharded optimizer, and return the state and updates
    with the shardings they came in with."""
    mesh = jax.make_mesh((1,), ("fsdp",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    params = {"layers": [{"w": 0.1 * jnp.ones((8, 4)) + 0.01 * i, "v": jnp.full((4, 6), 0.2)}
                         for i in range(3)]}
    specs = {"layers": [{"w": P("fsdp", None), "v": P(None, "fsdp")}] * 3}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    ref_opt = psgd_eqx.kron(1e-2, preconditioner_update_probability=1.0)
    ref_state = ref_opt.init(params)
    for _ in range(2):
        ref_u, ref_state = ref_opt.update(grads, ref_state, params)
    for owner in (None, "fsdp"):
        kw = dict(learning_rate=1e-2, preconditioner_update_probability=1.0,
                  params_partition_specs=specs, owner_axes=owner)
        opt = psgd_eqx.kron(**kw)
        s_specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw)
        place = lambda tree, sp: jax.device_put(tree, jax.tree.map(
            lambda s: NamedSharding(mesh, s), sp, is_leaf=lambda x: isinstance(x, P)))
        with jax.set_mesh(mesh):
            p = place(params, specs)
            g = place(grads, specs)
            state = jax.jit(opt.init)(p)
            state = place(state, s_specs)
            step = jax.jit(opt.update)
            for _ in range(2):
                u, state = step(g, state, p)
            got = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, (u, state))
        def norm(tree):  # P(None,) and P() are the same placement
            out = []
            for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P)):
                t = list(s)
                while t and t[-1] is None:
                    t.pop()
                out.append(tuple(t))
            return out

        assert norm(got) == norm((specs, s_specs))
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
        # the per-leaf accessor reads rows of stacks sharded over explicit axes, eagerly
        # and under jit (one device here; `owner_worker.py` reads them on 8, where the
        # rows need the accessor's explicit out-sharding)
        with jax.set_mesh(mesh):
            eager = state[0].preconditioners()
            traced = jax.jit(lambda st: st[0].preconditioner("['layers'][1]['w']"))(state)
        want = ref_state[0].preconditioners()
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(traced),
                        jax.tree.leaves(ref_state[0].preconditioner("['layers'][1]['w']"))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)
