"""Structure rules: the documented factor kinds for a table of shapes."""

import jax
import jax.numpy as jnp
import pytest

import psgd_eqx as pe


INF = float("inf")

# (shape, rules, expected factor kinds on the squeezed shape)
TABLE = [
    ((), {}, ("diag",)),
    ((1,), {}, ("diag",)),
    ((1, 1), {}, ("diag",)),
    ((7,), {}, ("diag",)),  # 1 axis < min_ndim_triangular = 2
    ((7,), {"min_ndim_triangular": 1}, ("diag",)),  # default skew 1.0: 7² > 1·7
    ((7,), {"min_ndim_triangular": 1, "max_skew_triangular": INF}, ("dense",)),
    ((1, 64), {}, ("diag",)),  # squeezed to a vector
    ((64, 32), {"max_skew_triangular": INF}, ("dense", "dense")),
    ((64, 1, 32), {"max_skew_triangular": INF}, ("dense", "dense")),
    ((64, 1, 32), {}, ("diag", "dense")),  # the default skew 1.0: 64² > 2048
    ((64, 32), {"max_skew_triangular": 1.0}, ("diag", "dense")),  # 64² > 2048
    ((64, 32), {}, ("diag", "dense")),
    ((32, 32), {"max_skew_triangular": 1.0}, ("dense", "dense")),
    ((10000, 64), {}, ("diag", "dense")),  # 10000 > max_size_triangular 8192
    ((100, 64), {"max_size_triangular": 80}, ("diag", "dense")),
    ((64, 32), {"memory_save_mode": "one_diag"}, ("diag", "dense")),
    ((32, 32), {"memory_save_mode": "one_diag"}, ("diag", "dense")),
    ((32, 32), {"memory_save_mode": "smart_one_diag"}, ("dense", "dense")),
    ((64, 32), {"memory_save_mode": "smart_one_diag"}, ("diag", "dense")),
    ((8, 16, 4), {"memory_save_mode": "one_triu"}, ("diag", "diag", "dense")),
    ((8, 16, 4), {"memory_save_mode": "all_diag"}, ("diag", "diag", "diag")),
    ((8, 16, 4), {}, ("dense", "dense", "dense")),
    ((3, 4, 5, 6), {"max_skew_triangular": 1.0}, ("dense", "dense", "dense", "dense")),
]


@pytest.mark.parametrize("shape,rules,kinds", TABLE)
def test_factor_kinds_table(shape, rules, kinds):
    plan = pe.kron_plan({"p": jax.ShapeDtypeStruct(shape, jnp.float32)}, **rules)["p"]
    assert plan.factor_kinds == kinds
    # the preconditioner the optimizer builds follows the plan
    opt = pe.scale_by_kron(**rules)
    state = opt.init({"p": jnp.zeros(shape)})
    q = state.preconditioners()["p"]
    assert tuple("dense" if d else "diag" for d in q.dense) == kinds
    assert q.state_bytes == plan.state_bytes


def test_eq_factors_are_triangular_and_bytes():
    plan = pe.kron_plan(jnp.zeros((64, 32)), geometry="EQ", max_skew_triangular=INF)
    assert plan.factor_kinds == ("triangular", "triangular")
    assert plan.state_bytes == (64 * 64 + 32 * 32) * 4 + 2 * 4
    cached = pe.kron_plan(jnp.zeros((64, 32)), cache_preconditioner=True,
                          max_skew_triangular=INF)
    assert cached.state_bytes == 2 * (64 * 64 + 32 * 32) * 4 + 2 * 4
    half = pe.kron_plan(jnp.zeros((64, 32)), precond_dtype=jnp.bfloat16,
                        max_skew_triangular=INF)
    assert half.state_bytes == (64 * 64 + 32 * 32) * 2 + 2 * 4
    assert "dense(64)" in str(plan).replace("triangular", "dense")


def test_plan_over_a_tree_prints_nothing(capsys):
    params = {"emb": jnp.zeros((50, 8)), "layers": [{"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}]}
    plans = pe.kron_plan(params)
    assert jax.tree.structure(plans) == jax.tree.structure(params)
    pe.kron(1e-3).init(params)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_size_triangular": -1}, "max_size_triangular"),
        ({"min_ndim_triangular": -1}, "min_ndim_triangular"),
        ({"max_skew_triangular": -2}, "max_skew_triangular"),
        ({"memory_save_mode": "half_diag"}, "memory_save_mode"),
    ],
)
def test_bad_rules_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        pe.kron_plan(jnp.zeros((4, 4)), **kwargs)


def _tree():
    return {
        "emb": jax.ShapeDtypeStruct((1000, 64), jnp.float32),
        "blocks": {"w": jax.ShapeDtypeStruct((4, 64, 256), jnp.float32)},
        "b": jax.ShapeDtypeStruct((64,), jnp.float32),
    }


def test_plan_scanned_layers_and_table():
    scanned = {"emb": False, "blocks": {"w": True}, "b": False}
    plan = pe.kron_plan(_tree(), scanned_layers=scanned, max_skew_triangular=INF)
    w = plan["blocks"]["w"]
    assert w.layers == 4 and w.axes == (64, 256) and w.factor_kinds == ("dense", "dense")
    assert w.state_bytes == 4 * (4 * (64 * 64 + 256 * 256) + 2 * 4)
    table = pe.plan_table(plan)
    leaves = jax.tree.leaves(plan, is_leaf=lambda x: isinstance(x, pe.LeafPlan))
    total = sum(p.state_bytes for p in leaves)
    assert f"**{total:,}**" in table and "4 layers × dense(64) ⊗ dense(256)" in table


def test_plan_budget_demotes_largest_dense_factor_first():
    free = pe.kron_plan(_tree())
    # the 1000×1000 factor of `emb` is by far the largest: it goes first
    tight = pe.kron_plan(_tree(), memory_budget_bytes=3_000_000)
    assert tight["emb"].factor_kinds == ("diag", "dense")
    assert tight["blocks"]["w"].factor_kinds == free["blocks"]["w"].factor_kinds
    leaves = jax.tree.leaves(tight, is_leaf=lambda x: isinstance(x, pe.LeafPlan))
    assert sum(p.state_bytes for p in leaves) <= 3_000_000
    # a budget below the all-diagonal state cannot be met
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        pe.kron_plan(_tree(), memory_budget_bytes=1000)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        pe.kron_plan(_tree(), memory_budget_bytes=-1)


def test_kron_builds_the_budgeted_plan():
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _tree())
    budget = 1_500_000
    scanned = {"emb": False, "blocks": {"w": True}, "b": False}
    opt = pe.kron(1e-3, scanned_layers=scanned, memory_budget_bytes=budget)
    state = opt.init(params)
    precond = state[0].preconditioners()
    plan = pe.kron_plan(params, scanned_layers=scanned, memory_budget_bytes=budget)
    assert precond["emb"].dense == tuple(k != "diag" for k in plan["emb"].factor_kinds)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(precond))
    assert nbytes == sum(
        p.state_bytes for p in jax.tree.leaves(plan, is_leaf=lambda x: isinstance(x, pe.LeafPlan))
    )
    assert nbytes <= budget


@pytest.mark.parametrize(
    "param_dtype, precond_dtype",
    [
        (jnp.float32, None),
        (jnp.float32, jnp.bfloat16),
        (jnp.bfloat16, None),
        (jnp.complex64, None),
        (jnp.complex64, jnp.bfloat16),  # stored as c64: one storage rule for plan and build
    ],
)
def test_plan_bytes_equal_built_bytes(param_dtype, precond_dtype):
    params = {
        "w": jnp.zeros((12, 5), param_dtype),
        "b": jnp.zeros((5,), param_dtype),
        "t": jnp.zeros((3, 4, 2), param_dtype),
        "stack": jnp.zeros((2, 6, 6), param_dtype),
    }
    kw = dict(precond_dtype=precond_dtype, cache_preconditioner=True,
              scanned_layers=lambda path, leaf: "stack" in jax.tree_util.keystr(path))
    plan = pe.kron_plan(params, **kw)
    state = pe.scale_by_kron(**kw).init(params)
    built = {
        jax.tree_util.keystr(path): q.state_bytes
        for path, q in jax.tree_util.tree_flatten_with_path(
            state.preconditioners(), is_leaf=lambda x: isinstance(x, pe.AbstractPrecond))[0]
    }
    planned = {
        jax.tree_util.keystr(path): lp.state_bytes
        for path, lp in jax.tree_util.tree_flatten_with_path(
            plan, is_leaf=lambda x: isinstance(x, pe.LeafPlan))[0]
    }
    assert planned == built
