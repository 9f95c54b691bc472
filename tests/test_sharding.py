"""Partition specs for the optimizer state, and sharded training on 8 simulated CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import psgd_eqx


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
    w = st.precond["w"]
    assert w.factors[0] == P("fsdp")  # rows like the sharded axis
    assert w.factors[1] == P("fsdp")  # the unsharded side is spread too (32 % 8 == 0)
    assert w.lipschitz == P()
    s = st.precond["s"]  # stacked: (4, 16, 16) and (4, 8, 8)
    assert s.inner.factors[0] == P(None, "fsdp")
    assert st.count == P() and st.key == P()


def test_divisibility_and_no_mesh():
    params = {"w": jnp.zeros((64, 12))}
    kw = dict(params_partition_specs={"w": P("fsdp", None)})
    with_mesh = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    assert with_mesh[0].precond["w"].factors == (P("fsdp"), P())  # 12 % 8 != 0
    without = psgd_eqx.get_opt_state_partition_specs(params, **kw)
    assert without[0].precond["w"].factors == (P("fsdp"), P())  # no sizes: no spreading
    small = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([128], ["fsdp"]), **kw)
    assert small[0].precond["w"].factors == (P(), P())  # 64 % 128 != 0: replicated


def test_preconditioner_partition_spec_and_scale_by_kron_only():
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    kw = dict(learning_rate=1e-3, weight_decay=0.1,
              params_partition_specs={"w": P("fsdp", "tp"), "b": P("tp")},
              preconditioner_partition_spec=P("tp", "fsdp"))
    mesh = _mesh([4, 2], ["fsdp", "tp"])
    specs = psgd_eqx.get_opt_state_partition_specs(params, True, mesh=mesh, **kw)
    assert isinstance(specs, psgd_eqx.PSGDState)
    assert specs.precond["w"].factors == (P("tp", "fsdp"), P("tp", "fsdp"))
    assert specs.precond["b"].factors == (P("tp"),)  # diagonal: like its axis


def test_blocked_stack_is_sharded_like_the_cut_axis():
    params = {"emb": jnp.zeros((1024, 64))}
    kw = dict(params_partition_specs={"emb": P("fsdp", None)},
              partition_grads_into_blocks=True, max_size_triangular=512, block_size=128)
    specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=_mesh([8], ["fsdp"]), **kw)
    q = specs[0].precond["emb"]
    assert isinstance(q, psgd_eqx.BlockedQ)
    # 8 blocks of (128, 64): the block axis takes "fsdp", the 64×64 factor cannot reuse it
    assert q.groups[0].factors == (P("fsdp"), P("fsdp"))


@pytest.fixture(scope="module")
def multi_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.pop("JAX_PLATFORMS", None)
    res = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["fsdp", "fsdp_tp"])
def test_sharded_step_matches_single_device(multi_device, mesh):
    assert multi_device["devices"] == 8
    r = multi_device[mesh]
    assert r["params_rel_diff"] < 1e-5, r
    assert r["state_rel_diff"] < 1e-4, r


@pytest.mark.parametrize("mesh", ["fsdp", "fsdp_tp"])
def test_no_large_factor_is_replicated(multi_device, mesh):
    r = multi_device[mesh]
    assert r["large_factors"] > 0
    assert r["replicated_large_factors"] == [], r


def test_state_memory_per_device_falls_linearly(multi_device):
    mem = {int(k): v for k, v in multi_device["memory"].items()}
    assert mem[1]["per_device"] == mem[1]["total"]
    for n in (2, 4, 8):
        assert mem[n]["total"] == mem[1]["total"]
        # ≈ linear: at most 10% above total / n (replicated scalars and Lipschitz state)
        assert mem[n]["per_device"] <= 1.1 * mem[1]["total"] / n, (n, mem)
