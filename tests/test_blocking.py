"""merge_small_dims and partition_grads_into_blocks: planning, BlockedQ, and the memory cap."""

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx
from psgd_eqx import BlockedQ, KronQ, _rng, kron_plan
from psgd_eqx._shapes import block_pieces, from_blocks, to_blocks


def _entries(q) -> int:
    """Factor entries of a built preconditioner (no Lipschitz state)."""
    if isinstance(q, BlockedQ):
        return sum(sum(int(np.prod(f.shape)) for f in g.factors) for g in q.groups)
    if isinstance(q, psgd_eqx.StackedQ):
        return _entries(q.inner)
    return sum(int(np.prod(f.shape)) for f in q.factors)


@pytest.mark.parametrize("n,b", [(10, 4), (7, 2), (256, 256), (257, 256), (1000, 96), (9, 3)])
def test_block_pieces_tile_without_padding(n, b):
    pieces = block_pieces(n, b)
    assert sum(c * s for c, s in pieces) == n
    assert sum(c for c, _ in pieces) == math.ceil(n / b)
    sizes = [s for _, s in pieces]
    assert max(sizes) <= b and max(sizes) - min(sizes) <= 1 and len(pieces) <= 2


@pytest.mark.parametrize("shape,blocks", [((10, 7), (4, None)), ((9, 5, 6), (4, 2, None))])
def test_blocks_round_trip(shape, blocks):
    pieces = tuple(
        ((1, n),) if b is None else block_pieces(n, b) for n, b in zip(shape, blocks)
    )
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    parts = to_blocks(x, pieces)
    assert sum(p.shape[0] * math.prod(p.shape[1:]) for p in parts) == x.size
    np.testing.assert_array_equal(from_blocks(parts, pieces, x.dtype), x)


def test_blocked_fit_equals_unblocked_fits_of_each_block():
    """No padding: every block is fitted exactly as a KronQ on that sub-tensor."""
    shape = (10, 7)
    make = lambda s: KronQ.init(s, merged=s, init_scale=0.7)  # noqa: E731
    q = BlockedQ.init(make, shape, shape, (4, None))
    key = jax.random.PRNGKey(1)
    h = jax.random.normal(jax.random.PRNGKey(2), shape)
    step = eqx.filter_jit(lambda q, h, k: q.update(None, h, lr=0.2, key=k))
    for _ in range(2):
        key, k = jax.random.split(key)
        new = step(q, h, k)
        # the same step by hand, block by block, with BlockedQ's key derivation
        hs = to_blocks(h, q.pieces)
        for gi, (grp, hb, kg) in enumerate(zip(q.groups, hs, _rng.split(k, len(hs)))):
            for bi, kb in enumerate(_rng.split(kg, hb.shape[0])):
                one = jax.tree.map(lambda x: x[bi], grp)
                want = step(one, hb[bi], kb)
                got = jax.tree.map(lambda x: x[bi], new.groups[gi])
                for a, b in zip(got.factors, want.factors):
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        q = new
    p = q.as_matrix()
    np.testing.assert_allclose(p, p.T, atol=1e-6)
    np.testing.assert_allclose(p @ h.ravel(), q.apply(h).ravel(), rtol=1e-5, atol=1e-6)
    assert q.num_blocks == 3


def test_blocked_whitening_fits_each_block():
    """Blocks with different scales: each block's P whitens its own block."""
    shape = (6, 4)
    q = BlockedQ.init(lambda s: KronQ.init(s, merged=s), shape, shape, (3, None))
    scales = jnp.array([1.0, 1.0, 1.0, 10.0, 10.0, 10.0])[:, None]

    def body(q, inp):
        key, lr = inp
        kg, kq = jax.random.split(key)
        return q.update(None, scales * jax.random.normal(kg, shape), lr=lr, key=kq), None

    steps = 3000
    lrs = jnp.geomspace(0.2, 0.005, steps)
    q, _ = eqx.filter_jit(lambda q: jax.lax.scan(
        body, q, (jax.random.split(jax.random.PRNGKey(0), steps), lrs)))(q)
    p = np.asarray(q.as_matrix())
    cov = np.diag(np.repeat(np.asarray(scales[:, 0]) ** 2, 4))
    whitened = p @ cov @ p
    # each block is whitened on average (a single block's entries fluctuate with the noise)
    np.testing.assert_allclose(np.diag(whitened)[:12].mean(), 1.0, rtol=0.15)
    np.testing.assert_allclose(np.diag(whitened)[12:].mean(), 1.0, rtol=0.15)
    # no coupling between the two blocks
    assert np.abs(p[:12, 12:]).max() < 1e-6


SHAPES = [
    (64, 32), (3, 3, 64, 128), (768, 12, 64), (20000, 96), (4, 20, 6), (30,), (1, 64),
    (5, 7, 9, 11),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_never_more_than_dense_per_axis_factors(shape):
    """The issue's cap: merging/blocking never costs more than Σᵢ nᵢ² factor entries."""
    axes = [n for n in shape if n != 1] or [1]
    cap = sum(n * n for n in axes)
    options = itertools.product(
        (False, True), (2, 64, 4096), (False, True), (2, 4, 256), (8, 64, 8192),
        (None, "one_diag"), (1, 2),
    )
    for merge, target, block, bs, max_size, mode, min_ndim in options:
        kw = dict(merge_small_dims=merge, target_merged_dim_size=target,
                  partition_grads_into_blocks=block, block_size=bs,
                  max_size_triangular=max_size, memory_save_mode=mode,
                  min_ndim_triangular=min_ndim)
        lp = kron_plan({"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, **kw)["w"]
        entries = (lp.state_bytes - 4 * len(lp.axes) * lp.num_blocks) // 4
        assert entries <= max(cap, sum(axes)), (kw, lp)


def test_64x32_weight_state_bound_in_the_built_optimizer():
    params = {"w": jnp.ones((64, 32))}
    for bs, target, max_size in itertools.product((2, 8, 256), (256, 2048, 4096), (8, 16, 8192)):
        opt = psgd_eqx.kron(merge_small_dims=True, target_merged_dim_size=target,
                            partition_grads_into_blocks=True, block_size=bs,
                            max_size_triangular=max_size, min_ndim_triangular=1)
        q = opt.init(params)[0].preconditioners()["w"]
        assert _entries(q) <= 64**2 + 32**2


def test_plan_matches_built_state_and_merges_where_rules_leave_room():
    params = {
        "qkv": jnp.ones((48, 4, 12)),
        "conv": jnp.ones((3, 3, 8, 16)),
        "emb": jnp.ones((300, 16)),
        "b": jnp.ones((16,)),
    }
    kw = dict(merge_small_dims=True, partition_grads_into_blocks=True, block_size=64,
              max_size_triangular=128, memory_save_mode="one_diag")
    plan = kron_plan(params, **kw)
    assert plan["qkv"].axes == (48, 48) and plan["qkv"].factor_kinds == ("diag", "dense")
    assert plan["qkv"].merged
    state = psgd_eqx.kron(**kw).init(params)[0]
    for name, q in state.preconditioners().items():
        assert q.state_bytes == plan[name].state_bytes, name
    assert state.preconditioners()["qkv"].merged == (48, 48)
    table = psgd_eqx.plan_table(plan)
    assert "merged (48, 48)" in table


@pytest.mark.slow  # default-suite time budget
def test_blocked_kron_trains_and_matches_plan():
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (40, 6))
    target = jax.random.normal(jax.random.PRNGKey(1), (40, 6))

    def loss(p):
        return jnp.mean((p["w"] * a - target) ** 2) + jnp.mean(p["s"] ** 2)

    params = {"w": jnp.zeros((40, 6)), "s": jnp.ones((3, 40, 6))}
    # skew ∞: the 40-axis is diagonal only for its length (the default skew 1.0 would
    # make it diagonal anyway, and nothing would be cut)
    kw = dict(partition_grads_into_blocks=True, block_size=16, max_size_triangular=20,
              scanned_layers={"w": False, "s": True}, max_skew_triangular=math.inf)
    opt = psgd_eqx.kron(0.05, **kw)
    state = opt.init(params)
    plan = kron_plan(params, **kw)
    assert isinstance(state[0].preconditioners()["w"], BlockedQ)
    assert isinstance(state[0].preconditioners()["s"], psgd_eqx.StackedQ)
    assert isinstance(state[0].preconditioners()["s"].inner, BlockedQ)
    assert plan["s"].layers == 3 and plan["s"].num_blocks == 3
    for name in params:
        assert state[0].preconditioners()[name].state_bytes == plan[name].state_bytes

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    l0 = loss(params)
    for _ in range(60):
        params, state = step(params, state)
    assert loss(params) < 0.2 * l0


def test_budget_demotes_a_blocked_axis():
    params = {"emb": jax.ShapeDtypeStruct((1000, 16), jnp.float32)}
    kw = dict(partition_grads_into_blocks=True, block_size=100, max_size_triangular=256,
              max_skew_triangular=math.inf)
    full = kron_plan(params, **kw)["emb"]
    assert full.blocks and full.num_blocks == 10
    cut = kron_plan(params, **kw, memory_budget_bytes=full.state_bytes - 1)["emb"]
    assert cut.state_bytes <= full.state_bytes - 1 and cut.num_blocks == 1


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(block_size=1), "block_size"),
        (dict(target_merged_dim_size=0), "target_merged_dim_size"),
    ],
)
def test_bad_options_raise(kw, name):
    with pytest.raises(ValueError, match=name):
        psgd_eqx.kron(**kw)
    with pytest.raises(ValueError, match=name):
        kron_plan({"w": jnp.ones((4, 4))}, **kw)
