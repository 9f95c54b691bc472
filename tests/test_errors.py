"""Clear errors in named places: a bad option fails at construction naming the option; a
tree or leaf that does not fit the state fails at `init`/`update` naming the parameter path.
Also how non-floating, Python-scalar and empty leaves are treated (as `optax.adam` does
where it can), and `scanned_layers` under `optax.inject_hyperparams`."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx as pe
from psgd_eqx._options import unwrap


def _structure(path, leaf):
    return pe.DiagQ.init(leaf.shape)


# name -> (factory, the positional arguments it needs before its options)
FACTORIES = {
    "kron": (pe.kron, ()),
    "scale_by_kron": (pe.scale_by_kron, ()),
    "psgd": (pe.psgd, (1e-3, _structure)),
    "scale_by_psgd": (pe.scale_by_psgd, (_structure,)),
    "xmat": (pe.xmat, ()),
    "lra": (pe.lra, ()),
    "dense": (pe.dense, ()),
    "affine": (pe.affine, ()),
    "diag": (pe.diag, ()),
    "kron_plan": (pe.kron_plan, ({"w": jnp.ones((2, 2))},)),
}
# Numeric options whose default is `None` (off / not given): found by name.
NUMERIC_NONE_DEFAULT = {
    "preconditioner_init_scale", "grad_clip_max_amp", "grad_clip_max_element",
    "update_global_norm_clip", "memory_budget_bytes", "precond_lr", "precond_init_scale",
    "uvd_rank_of_approximation", "seed",
}
# Every other parameter that is not a number (a new option must be put in one of the two).
NOT_NUMERIC = {
    "params", "structure", "global_structure", "weight_decay_mask", "mask", "memory_save_mode",
    "geometry", "mu_dtype", "precond_dtype", "whiten_grad", "momentum_into_precond_update",
    "scanned_layers", "params_partition_specs", "preconditioner_partition_spec",
    "step_normalizer_order", "precision", "nesterov", "norm_bound", "bucket_leaves",
    "use_kernels", "owner_axes", "update_clip_style",
}


def _numeric_options():
    cases = []
    for factory, (fn, _) in FACTORIES.items():
        for name, p in inspect.signature(fn).parameters.items():
            default = unwrap(p.default)
            # a number or a schedule (kron's default refit probability is a schedule)
            scheduled = name in ("learning_rate", "preconditioner_update_probability")
            if scheduled or name in NUMERIC_NONE_DEFAULT or (
                isinstance(default, (int, float)) and not isinstance(default, bool)
            ):
                cases.append((factory, name))
            else:
                assert name in NOT_NUMERIC or isinstance(default, bool), (factory, name)
    return cases


NUMERIC = _numeric_options()


def _build(factory, name, value):
    fn, args = FACTORIES[factory]
    if name == "learning_rate" and args:  # psgd's positional learning rate
        return fn(value, *args[1:])
    return fn(*args, **{name: value})


def test_every_factory_has_numeric_options():
    counts = {f: sum(1 for g, _ in NUMERIC if g == f) for f in FACTORIES}
    assert all(n >= (6 if f == "kron_plan" else 12) for f, n in counts.items()), counts


# -- 4. strings and bools where numbers go -----------------------------------------------


@pytest.mark.parametrize("factory,name", NUMERIC, ids=lambda x: str(x))
def test_string_for_a_number_names_the_option(factory, name):
    with pytest.raises((TypeError, ValueError), match=f"`{name}`") as info:
        _build(factory, name, "0.1")
    assert "0.1" in str(info.value)


@pytest.mark.parametrize("factory,name", NUMERIC, ids=lambda x: str(x))
def test_bool_for_a_number_names_the_option(factory, name):
    with pytest.raises((TypeError, ValueError), match=f"`{name}`"):
        _build(factory, name, True)


# -- 1. a grads tree that does not match the state names the first differing path --------

_PARAMS = {"layer1": {"w": jnp.ones((3, 2)), "x": jnp.ones(2)}, "b": jnp.ones(2)}


def _like(tree, **changes):
    """`tree` with `changes` applied at dotted paths ("layer1.w": new value)."""
    out = jax.tree.map(lambda x: x, tree)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = out
        for k in parents:
            node = node[k]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value
    return out


_DROP = object()


@pytest.fixture(scope="module")
def kron_and_state():
    opt = pe.kron(1e-3)
    return opt, opt.init(_PARAMS)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"layer1.y": jnp.ones(2)},
         r"grads has key 'y' at \['layer1'\] but the optimizer state .* has keys \['w', 'x'\]"),
        ({"layer1.x": _DROP}, r"grads lacks key 'x' at \['layer1'\].*keys \['w', 'x'\]"),
        ({"layer1": jnp.ones(3)},
         r"grads has a leaf of shape \(3,\) at \['layer1'\] where .* has a dict with keys"),
        ({"b": {"c": jnp.ones(2)}},
         r"grads has a dict with keys \['c'\] at \['b'\] where .* has a leaf \(with a KronQ"),
        ({"layer1.w": None}, r"grads has None at \['layer1'\]\['w'\].*eqx.filter"),
        ({"layer1.w": [jnp.ones(2)]}, r"grads has a list of length 1 at \['layer1'\]\['w'\]"),
    ],
)
def test_mismatched_tree_names_the_first_differing_path(kron_and_state, changes, match):
    opt, state = kron_and_state
    with pytest.raises(ValueError, match=match):
        opt.update(_like(_PARAMS, **changes), state, _PARAMS)


def test_mismatched_lists_and_modules():
    key = jax.random.PRNGKey(0)
    model = [eqx.nn.Linear(2, 3, key=key), eqx.nn.Linear(3, 1, key=key)]
    opt = pe.scale_by_psgd(_structure)
    state = opt.init(model)
    with pytest.raises(ValueError, match=r"grads has a list of length 1 at the top level .* "
                                         r"has a list of length 2"):
        opt.update(model[:1], state)
    with pytest.raises(ValueError, match=r"grads has a tuple of length 2 at the top level"):
        opt.update(tuple(model), state)
    no_bias = [model[0], eqx.nn.Linear(3, 1, use_bias=False, key=key)]
    with pytest.raises(ValueError, match=r"grads has a Linear at \[1\] whose static fields"):
        opt.update(no_bias, state)
    other = [model[0], eqx.nn.Conv1d(3, 1, 1, key=key)]
    with pytest.raises(ValueError, match=r"grads has a Conv1d with children .* at \[1\] "
                                         r"where .* has a Linear"):
        opt.update(other, state)



def test_none_gradient_where_the_params_had_none_passes():
    key = jax.random.PRNGKey(0)
    model = eqx.filter([eqx.nn.Linear(2, 3, key=key), eqx.nn.Lambda(jax.nn.relu)],
                       eqx.is_inexact_array)
    params = {"model": model, "frozen": None}
    opt = pe.scale_by_psgd(_structure)
    # traced only (no compile): the check runs before the step is traced
    updates, _ = jax.eval_shape(opt.update, params, opt.init(params))
    assert updates["frozen"] is None and updates["model"][1].fn is None


def test_newton_pair_is_checked_too():
    params = {"w": jnp.ones((2, 2))}
    opt = pe.dense(1.0, per_leaf=True)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"Hvp at \['w'\] has shape \(4,\)"):
        opt.update(params, state, params, Hvp={"w": jnp.ones(4)}, vector=params)
    with pytest.raises(ValueError, match=r"vector has key 'v'"):
        opt.update(params, state, params, Hvp=params, vector={"w": jnp.ones((2, 2)),
                                                              "v": jnp.ones(1)})


# -- 2. a wrong shape or dtype names the leaf ---------------------------------------------


def test_wrong_shape_names_the_leaf_and_both_shapes(kron_and_state):
    opt, state = kron_and_state
    with pytest.raises(ValueError, match=r"grads at \['layer1'\]\['w'\] has shape \(2, 3\), "
                                         r"but .* expects \(3, 2\)"):
        opt.update(_like(_PARAMS, **{"layer1.w": jnp.ones((2, 3))}), state, _PARAMS)


def test_wrong_shape_of_a_leaf_without_preconditioner_is_read_from_the_momentum():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    opt = pe.scale_by_psgd(lambda path, leaf: None if leaf.ndim == 1 else _structure(path, leaf))
    state = opt.init(params)
    assert state.preconditioners()["b"] is None
    with pytest.raises(ValueError, match=r"grads at \['b'\] has shape \(3,\), .* expects \(2,\)"):
        opt.update({"w": jnp.ones((3, 2)), "b": jnp.ones(3)}, state)


def test_wrong_size_of_the_global_group_names_its_leaves():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    opt = pe.xmat(b1=0.0)  # no momentum: the group's total size is the only record
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"global group in grads \(\['a'\], \['b'\]\) have 8 "
                                         r"elements.* built for 7"):
        opt.update({"a": jnp.ones(4), "b": jnp.ones((2, 2))}, state, params)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jax.dtypes.float0])
def test_non_floating_gradient_of_a_preconditioned_leaf(kron_and_state, dtype):
    opt, state = kron_and_state
    grads = _like(_PARAMS, **{"layer1.x": np.zeros(2, dtype)})
    with pytest.raises(TypeError, match=r"grads at \['layer1'\]\['x'\] has dtype .*"
                                        r"needs floating"):
        opt.update(grads, state, _PARAMS)


# -- 3. a structure that returns a preconditioner of the wrong shape fails at init --------


def test_structure_of_the_wrong_shape_fails_at_init_naming_the_path():
    params = {"enc": {"w": jnp.ones((3, 4))}}
    opt = pe.scale_by_psgd(lambda path, leaf: pe.KronQ.init(leaf.shape[::-1]))
    with pytest.raises(ValueError, match=r"KronQ of shape \(4, 3\) for \['enc'\]\['w'\], "
                                         r"whose leaf has shape \(3, 4\)"):
        opt.init(params)
    flat = pe.scale_by_psgd(lambda path, leaf: pe.DiagQ.init((leaf.size,)))
    with pytest.raises(ValueError, match=r"DiagQ of shape \(12,\) for \['enc'\]\['w'\]"):
        flat.init(params)


def test_global_structure_of_the_wrong_size_fails_at_init():
    opt = pe.scale_by_psgd(lambda path, leaf: pe.GLOBAL,
                           global_structure=lambda n, dtype: pe.DiagQ.init((n + 1,), dtype))
    with pytest.raises(ValueError, match=r"global_structure\(12, \.\.\.\)` must return .* "
                                         r"shape \(12,\).*got a DiagQ of shape \(13,\)"):
        opt.init({"w": jnp.ones((3, 4))})


# -- 5. integer, boolean and Python-scalar leaves -----------------------------------------
#
# `optax.adam` keeps an integer buffer for an int leaf and fails on its float0 gradient
# (`jax.grad(..., allow_int=True)`); under strict promotion it also fails on integer zeros.
# A Python float leaf is a 0-d array to it. psgd_eqx's rule (`_build.py`): a non-floating
# leaf gets no preconditioner (`structure` is not called) and a zero update; a Python scalar
# is a 0-d array.


def _recording_structure(seen):
    def structure(path, leaf):
        seen.append(jax.tree_util.keystr(path))
        return pe.DiagQ.init(leaf.shape)

    return structure


def test_non_floating_and_empty_leaves_get_no_preconditioner():
    params = {"w": jnp.ones(2), "i": jnp.arange(3), "flag": jnp.array([True]),
              "empty": jnp.ones((0, 4))}
    seen = []
    state = pe.scale_by_psgd(_recording_structure(seen)).init(params)
    assert seen == ["['w']"]  # structure is called for floating, non-empty leaves only
    assert state.preconditioners()["i"] is None and state.preconditioners()["flag"] is None
    assert state.preconditioners()["empty"] is None
    plan = pe.kron_plan(params)
    assert plan["i"].factor_kinds == () and plan["i"].state_bytes == 0
    assert plan["i"].describe() == "none"
    assert pe.kron(1e-3).init(params)[0].preconditioners()["i"] is None



@pytest.mark.parametrize("grad", ["float0", "zeros"])
def test_int_leaf_gets_a_zero_update(grad):
    params = {"w": jnp.ones(2), "i": jnp.arange(3)}
    opt = pe.scale_by_psgd(_structure)
    state = opt.init(params)
    if grad == "float0":
        grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    else:
        grads = {"w": 2 * params["w"], "i": jnp.zeros(3, jnp.int32)}
    updates, _ = jax.eval_shape(opt.update, grads, state)
    assert updates["i"].shape == (3,) and updates["i"].dtype == grads["i"].dtype


def test_python_float_leaf_is_planned_as_a_0d_array():
    plan = pe.kron_plan({"w": jnp.ones((2, 2)), "scale": 1.5})
    assert plan["scale"].shape == () and plan["scale"].factor_kinds == ("diag",)
    # without momentum (whose buffer the step builds from the leaf) init already works
    state = pe.scale_by_psgd(_structure, b1=0.0).init({"scale": 1.5})
    assert state.preconditioners()["scale"].shape == ()


def test_python_float_leaf_is_a_0d_array():
    params = {"w": jnp.ones(2), "scale": 1.5}
    opt = pe.scale_by_psgd(_structure)
    state = opt.init(params)
    updates, _ = jax.eval_shape(opt.update, {"w": jnp.ones(2), "scale": 0.5}, state)
    assert updates["scale"].shape == ()


# -- 6. scanned_layers as a tree of bools under optax.inject_hyperparams -----------------


class _Block(eqx.Module):
    w: jax.Array
    b: jax.Array


class _CallableBlock(_Block):
    def __call__(self, x):
        return x


_SCAN_PARAMS = _Block(jnp.ones((2, 3, 3)), jnp.ones(3))


@pytest.mark.parametrize("form", ["dict", "module", "callable module + static_args"])
def test_scanned_layers_tree_under_inject_hyperparams(form):
    params, static_args = _SCAN_PARAMS, ()
    if form == "dict":
        params = {"w": params.w, "b": params.b}
        scanned = {"w": True, "b": False}
    elif form == "module":
        scanned = _Block(True, False)  # not callable: inject_hyperparams passes it as is
    else:
        scanned, static_args = _CallableBlock(True, False), ("scanned_layers",)
    opt = optax.inject_hyperparams(pe.kron, static_args=static_args)(
        learning_rate=1e-3, scanned_layers=scanned)
    state = opt.init(params)
    # the jitted update traced (compiling it adds nothing that depends on the form)
    updates, state = jax.eval_shape(jax.jit(opt.update), params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    precond = jax.tree.leaves(state.inner_state[0].preconditioners(),
                              is_leaf=lambda x: isinstance(x, pe.AbstractPrecond))
    assert sorted(isinstance(q, pe.StackedQ) for q in precond) == [False, True]


def test_callable_module_without_static_args_names_static_args():
    # inject_hyperparams takes any callable for a schedule and passes its value
    opt = optax.inject_hyperparams(pe.kron)(
        learning_rate=1e-3, scanned_layers=_CallableBlock(True, False))
    with pytest.raises(ValueError, match=r"scanned_layers.*static_args=\(\"scanned_layers\""):
        opt.init(_SCAN_PARAMS)


def test_scanned_layers_must_hold_bools():
    with pytest.raises(TypeError, match=r"scanned_layers.*got 0.5 at \['w'\]"):
        pe.kron_plan({"w": jnp.ones((2, 3, 3))}, scanned_layers={"w": 0.5})


# -- 7. kron_plan and init agree on empty leaves -----------------------------------------


def test_plan_and_init_agree_on_empty_leaves():
    params = {"a": jnp.ones((0, 4)), "b": jnp.ones((3, 0)), "c": jnp.ones((0,)),
              "stack": jnp.ones((0, 3, 3)), "w": jnp.ones((3, 4))}
    kw = dict(scanned_layers={"stack": True})
    plan = pe.kron_plan(params, **kw)
    precond = pe.scale_by_kron(**kw).init(params).preconditioners()
    for name in ("a", "b", "c", "stack"):
        assert precond[name] is None, name
        assert plan[name].factor_kinds == () and plan[name].state_bytes == 0, name
        assert plan[name].shape == params[name].shape
    assert plan["w"].state_bytes == precond["w"].state_bytes > 0
    assert sum(p.state_bytes for p in plan.values()) == sum(
        q.state_bytes for q in jax.tree.leaves(
            precond, is_leaf=lambda x: isinstance(x, pe.AbstractPrecond)))
    assert "| `['a']` | (0, 4) | none | 0 |" in pe.plan_table(plan)
