"""Owner-computes sharding (`owner_axes`): the layout at `init` (cheap, in process) and,
in a subprocess with 8 simulated CPU devices, equality with one device on 1, 2, 4 and 8
devices plus what one `update` costs in both modes (`tests/owner_worker.py`)."""

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


def _params(layers=3):
    return {"layers": [{"w": jnp.ones((8, 4)), "b": jnp.ones((4,))} for _ in range(layers)],
            "head": jnp.ones((4, 2))}


def _mesh(n):
    return AbstractMesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))


def test_owner_layout_pads_stacks_and_shards_them():
    params = _params()
    opt = psgd_eqx.kron(1e-3, owner_axes="fsdp", max_skew_triangular=float("inf"))
    with jax.sharding.use_abstract_mesh(_mesh(4)):
        st = opt.init(params)[0]
    layout = st.precond
    assert layout.owner == ("fsdp",)
    sizes = {len(idx): pad for idx, pad in zip(layout.index, layout.pad)}
    assert sizes == {1: 0, 3: 1}  # 3 members padded to 4; the head (one of a kind) is not
    for idx, stack in zip(layout.index, layout.stacks):
        if len(idx) == 3:  # every array of a padded stack has 4 rows
            assert {x.shape[0] for x in jax.tree.leaves(stack)} == {4}
    # the per-leaf view has the real members only, the padding is an identity copy
    w = st.preconditioners()["layers"][2]["w"]
    assert w.factors[0].shape == (8, 8)
    g = [i for i, idx in enumerate(layout.index) if len(idx) == 3 and
         layout.stacks[i].shape == (8, 4)][0]
    pad_row = jax.tree.map(lambda x: x[3], layout.stacks[g])
    assert jax.tree.all(jax.tree.map(jnp.array_equal, pad_row,
                                     jax.tree.map(lambda x: x[0], layout.stacks[g])))
    specs = psgd_eqx.get_opt_state_partition_specs(
        params, mesh=_mesh(4), owner_axes="fsdp", max_skew_triangular=float("inf"))[0]
    assert specs.precond.stacks[g].factors == (P("fsdp"), P("fsdp"))
    # a bucket of one keeps its placement (replicated here: no params specs given)
    h = [i for i, idx in enumerate(layout.index) if len(idx) == 1][0]
    assert specs.precond.stacks[h].factors == (P(), P())


def _loads(lengths, costs, n):
    from psgd_eqx._packing import pack

    pads, slots = pack(lengths, costs, n)
    load = [0] * n
    for m, pad, rows, c in zip(lengths, pads, slots, costs):
        if m < 2:
            assert pad == 0 and rows == ()
            continue
        size = m + pad
        assert size % n == 0 and pad < n  # a multiple of n, at most one row per device
        assert len(set(rows)) == m and all(0 <= r < size for r in rows)
        k = size // n
        for d in range(n):  # each device's real rows are its first ones
            mine = sorted(r - d * k for r in rows if r // k == d)
            assert mine == list(range(len(mine)))
            load[d] += len(mine) * c
    return load


def test_packing_balances_members_across_buckets():
    # four buckets of 4 members on 8 devices: two buckets per half, not all on 0-3
    load = _loads([4, 4, 4, 4], [656, 617, 543, 656], 8)
    assert max(load) / (sum(load) / 8) <= 1.05, load
    # multiples of n keep the plain layout (member j in row j, no padding)
    from psgd_eqx._packing import pack
    assert pack([8, 16, 1], [5, 3, 9], 8) == ([0, 0, 0], [tuple(range(8)),
                                                       tuple(range(16)), ()])
    # uneven lengths and costs: never worse than padding every stack, and within one
    # member of the most expensive bucket of the even share (greedy longest-first)
    for lengths, costs, n in [([3, 5, 2, 7], [10, 3, 8, 1], 4), ([2, 2, 2], [1, 1, 1], 8),
                              ([9, 4, 6, 1], [2, 7, 3, 100], 8)]:
        load = _loads(lengths, costs, n)
        even = sum(m * c for m, c in zip(lengths, costs) if m > 1) / n
        padded = sum(-(-m // n) * c for m, c in zip(lengths, costs) if m > 1)
        assert max(load) <= padded
        assert max(load) <= even + max(c for m, c in zip(lengths, costs) if m > 1)


def test_owner_layout_packs_buckets_onto_different_devices():
    d = 8
    shapes = {"qkv": (d, 3 * d), "o": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
    params = {"layers": [{k: jnp.ones(s) for k, s in shapes.items()} for _ in range(4)]}
    opt = psgd_eqx.kron(1e-3, owner_axes="fsdp", max_skew_triangular=float("inf"))
    with jax.sharding.use_abstract_mesh(_mesh(8)):
        layout = opt.init(params)[0].precond
    first = {min(rows) for rows in layout.slots}
    assert layout.pad == (4, 4, 4, 4) and first == {0, 4}, layout.slots
    # the per-leaf view reads each member from its row
    one = psgd_eqx.kron(1e-3, max_skew_triangular=float("inf")).init(params)[0]
    assert jax.tree.all(jax.tree.map(jnp.array_equal, layout.tree(), one.precond.tree()))


def test_owner_axes_errors_name_the_problem():
    with pytest.raises(ValueError, match="jax.set_mesh"):
        psgd_eqx.kron(1e-3, owner_axes="fsdp").init(_params())
    with pytest.raises(ValueError, match="'tp'"):
        with jax.sharding.use_abstract_mesh(_mesh(2)):
            psgd_eqx.kron(1e-3, owner_axes=("fsdp", "tp")).init(_params())
    with pytest.raises(ValueError, match="owner_axes"):
        psgd_eqx.kron(1e-3, owner_axes=3)


@pytest.mark.slow
def test_owner_computes_on_1_2_4_8_devices_equals_one_device():
    worker = pathlib.Path(__file__).with_name("owner_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for n, d in out["equal"].items():
        assert d["count"] == 5, n
        assert d["params"] < 2e-5 and d["preconditioners"] < 2e-5, (n, d)
    for n, d in out["equal_tracked"].items():  # track_diagnostics + adaptive refits
        assert d["refits"][0] == d["refits"][1], (n, d)
        assert d["params"] < 2e-5 and d["figures"] < 1e-4, (n, d)
    # owner-computes under a mesh of Explicit axes: the single-device numbers too
    assert out["explicit"]["updates"] < 2e-5, out["explicit"]
    assert out["explicit"]["preconditioners"] < 2e-5, out["explicit"]
    owner, placement = out["owner"], out["placement"]
    buckets = owner["buckets"]
    assert buckets == 3
    # one all-to-all in and one out per bucket, plus a few all-reduces (finite checks)
    assert sum(owner["collectives"].values()) <= 2 * buckets + 4, owner
    assert owner["collectives"]["all-to-all"] == 2 * buckets, owner
    assert owner["collectives"]["all-gather"] == 0, owner
    assert placement["flops"] > 0
    # every bucket has 8 members on 8 devices: each device does an eighth of the work
    assert owner["flops"] <= 1.1 * out["single_flops"] / 8, (owner, out["single_flops"])
    assert owner["precond_bytes_per_device"] <= 1.01 * out["single_precond_bytes"] / 8
    # four buckets of 4 on 8 devices: padded stacks, members packed across buckets
    packed = out["packed"]
    assert packed["buckets"] == 4 and packed["stack_pad"] == [4, 4, 4, 4], packed
    assert packed["flops"] <= 1.1 * out["packed_single_flops"] / 8, packed
    assert sum(packed["collectives"].values()) <= 2 * 4 + 4, packed
    # memory: the even share plus at most one bucket's padding
    assert packed["precond_bytes_per_device"] <= (
        out["packed_single_precond_bytes"] / 8 + packed["max_bucket_pad_bytes"]), packed


def test_relayout_moves_a_state_between_owner_sizes_and_modes():
    """A state in one layout, re-padded for another, equals the other optimizer's own
    state on every real row, and has that optimizer's structure and shapes."""
    params = _params(layers=3)
    kw = dict(max_skew_triangular=float("inf"),
              preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule())
    placement = psgd_eqx.kron(1e-3, **kw)
    state = placement.init(params)
    g = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    for _ in range(2):
        _, state = placement.update(g, state, params)

    owner = psgd_eqx.kron(1e-3, owner_axes="fsdp", **kw)
    for size in (4, 8):
        moved = psgd_eqx.relayout_owner_state(state, "fsdp", size=size)
        with jax.sharding.use_abstract_mesh(_mesh(size)):
            want = jax.eval_shape(owner.init, params)
        assert jax.tree.structure(moved) == jax.tree.structure(want)
        assert [x.shape for x in jax.tree.leaves(moved)] == [
            x.shape for x in jax.tree.leaves(want)]
        # every parameter's preconditioner is carried over exactly
        assert jax.tree.all(jax.tree.map(jnp.array_equal, moved[0].preconditioners(),
                                         state[0].preconditioners()))
        # and back to placement (no padding): the original state
        back = psgd_eqx.relayout_owner_state(moved, None)
        assert jax.tree.structure(back) == jax.tree.structure(state)
        assert jax.tree.all(jax.tree.map(jnp.array_equal, back, state))
    # between owner sizes (8 → 4) directly
    s8 = psgd_eqx.relayout_owner_state(state, "fsdp", size=8)
    s4 = psgd_eqx.relayout_owner_state(s8, "fsdp", size=4)
    assert jax.tree.all(jax.tree.map(
        jnp.array_equal, s4, psgd_eqx.relayout_owner_state(state, "fsdp", size=4)))
    with pytest.raises(ValueError, match="jax.set_mesh"):  # no size and no mesh
        psgd_eqx.relayout_owner_state(state, "fsdp")
