"""Clear errors in named places: a bad option fails at construction naming the option; a
tree or leaf that does not fit the state fails at `init`/`update` naming the parameter path.
Also how non-floating, Python-scalar and empty leaves are treated (as `optax.adam` does
where it can), and `scanned_layers` under `optax.inject_hyperparams`."""

import inspect
import math

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
}
# Numeric options whose default is `None` (off / not given): found by name.
NUMERIC_NONE_DEFAULT = {
    "preconditioner_init_scale", "grad_clip_max_amp", "grad_clip_max_element",
    "update_global_norm_clip", "memory_budget_bytes", "precond_lr", "precond_init_scale",
    "uvd_rank_of_approximation", "seed",
}
# Every other parameter that is not a number (a new option must be put in one of the two).
NOT_NUMERIC = {
    "structure", "global_structure", "weight_decay_mask", "mask", "memory_save_mode",
    "geometry", "mu_dtype", "precond_dtype", "whiten_grad", "momentum_into_precond_update",
    "scanned_layers", "params_partition_specs", "preconditioner_partition_spec",
    "step_normalizer_order", "precision", "nesterov", "norm_bound", "bucket_leaves",
    "use_kernels",
}


def _numeric_options():
    cases = []
    for factory, (fn, _) in FACTORIES.items():
        for name, p in inspect.signature(fn).parameters.items():
            default = unwrap(p.default)
            if name == "learning_rate" or name in NUMERIC_NONE_DEFAULT or (
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
    assert all(n >= 12 for n in counts.values()), counts


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
