"""Same-shape bucketing: identical results, fewer ops."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import psgd_eqx
from psgd_eqx._bucket import bucketed_map, buckets


def _tree(layers=4, d=8):
    key = jax.random.PRNGKey(0)
    out = {"layers": [], "head": jax.random.normal(key, (d, 3))}
    for i in range(layers):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out["layers"].append({"w": jax.random.normal(k1, (d, d)),
                              "u": jax.random.normal(k2, (d, 2 * d)), "b": jnp.zeros(d)})
    return out


def test_buckets_group_identical_items_only():
    a, b = jnp.zeros((3, 3)), jnp.zeros((3, 4))
    items = [(a,), (b,), None, (a,), (a.astype(jnp.bfloat16),)]
    assert buckets(items) == [[0, 3], [1], [4]]
    out = bucketed_map(lambda x: x.sum() + x.shape[-1], items)
    assert out[2] is None and float(out[0]) == 3.0 and float(out[1]) == 4.0


def test_bucketed_equals_per_leaf():
    params = _tree(layers=2)  # buckets of two: the per-leaf run compiles every leaf
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3.0 * p), params)
    results = {}
    for bucket in (True, False):  # "auto" is the same code path as True
        opt = psgd_eqx.kron(1e-2, bucket_leaves=bucket)
        state = opt.init(params)
        step = jax.jit(opt.update)
        for _ in range(3):
            u, state = step(grads, state, params)
        # the state stores one stack per bucket: compare its per-leaf view
        (st,) = [x for x in state if isinstance(x, psgd_eqx.PSGDState)]
        results[bucket] = (u, st.mu, st.preconditioners(), st.count, st.refits)
    assert jax.tree.structure(results[True]) == jax.tree.structure(results[False])
    pairs = list(zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])))
    for x, y in pairs:
        if jnp.issubdtype(x.dtype, jnp.floating):
            scale = float(jnp.max(jnp.abs(y))) + 1e-12
            np.testing.assert_allclose(x, y, atol=1e-5 * scale, rtol=0)
        elif not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(x, y)


def test_state_stores_one_stack_per_bucket():
    params = {**_tree(layers=3), "step": jnp.zeros((), jnp.int32)}
    st = psgd_eqx.kron(1e-2).init(params)[0]
    # buckets: the 3 w, the 3 u, the 3 b, the head; the int leaf is in none
    sizes = sorted(len(idx) for idx in st.precond.index)
    assert sizes == [1, 3, 3, 3]
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    w = [names.index(f"['layers'][{i}]['w']") for i in range(3)]
    g = st.precond.index.index(tuple(w))
    assert st.precond.stacks[g].factors[0].shape == (3, 8, 8)
    # the per-leaf views: one module per leaf, slices of the stack
    assert st.preconditioner("['layers'][1]['w']").factors[0].shape == (8, 8)
    assert st.preconditioners()["step"] is None
    path = jax.tree_util.tree_flatten_with_path(params)[0][w[2]][0]
    assert st.preconditioner(path) is not None
    try:
        st.preconditioner("['nope']")
    except KeyError as e:
        assert "the paths are: ['head'], ['layers'][0]['b']" in e.args[0]
    else:
        raise AssertionError("no KeyError")


def test_bucketing_emits_fewer_ops():
    params = _tree(layers=12)
    grads = jax.tree.map(jnp.ones_like, params)
    counts = {}
    for bucket in (True, False):
        opt = psgd_eqx.kron(1e-2, bucket_leaves=bucket)
        text = jax.jit(opt.update).lower(grads, opt.init(params), params).as_text()
        counts[bucket] = len(re.findall(r"stablehlo\.", text))
    assert counts[True] * 2 <= counts[False], counts


def test_bad_bucket_option():
    import pytest

    with pytest.raises(ValueError, match="bucket_leaves"):
        psgd_eqx.kron(bucket_leaves="sometimes")
