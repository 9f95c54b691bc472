"""Eager calls reuse one compiled function.

Called outside any trace (a loop without `jax.jit`, as psgd_jax's README examples are
written), JAX would run every primitive of a step as its own dispatch and retrace every
`lax.cond`, compiling its branches again on each call: seconds per step and memory that
grows with every call. So `update` (of every alias) and `hessian_helper`, when none of
their inputs is a tracer, run a jitted copy of themselves instead; inside
`jit`/`vmap`/`scan`/`grad` they run as written and nothing changes.

The compiled function of an optimizer is cached per *configuration*, not per instance:
the options that are not arrays (floats, strings, callables by identity, ...) form the
cache key and the array-valued ones (e.g. the hyperparameters `optax.inject_hyperparams`
passes, which change every step) are arguments of the compiled function. Two optimizers
built with the same options, and every step of an eagerly run `inject_hyperparams`
optimizer, therefore share one compiled function per input shape/dtype/tree structure.
"""

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from ._options import Options


# Compiled steps of this many configurations are kept (least recently used go first), so
# a sweep over many Python-float learning rates does not keep every executable alive.
_MAX_CONFIGS = 32
_compiled: OrderedDict = OrderedDict()


def is_traced(tree: Any) -> bool:
    """Whether any leaf of `tree` is a JAX tracer (we are inside a transformation)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _as_arrays(tree: Any) -> Any:
    # A Python float leaf would be a static argument of the compiled function (one compile
    # per value); as a weakly typed array it is traced like any gradient.
    def one(x):
        return jnp.asarray(x) if isinstance(x, (float, complex)) else x

    return jax.tree.map(one, tree)


def _config_key(options: dict) -> tuple[Any, Any] | None:
    """`(hashable key of the non-array options, their pytree)`, or `None` if unhashable."""
    static = eqx.filter(dict(options), eqx.is_array, inverse=True)
    leaves, treedef = jax.tree.flatten(static)
    key = (treedef, tuple(leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key, static


def _compiled_update(build: Callable, key: Any, static: dict) -> Callable:
    """The jitted `update` of `build(options)` for this configuration (cached)."""
    cache_key = (build, key)
    if cache_key in _compiled:
        _compiled.move_to_end(cache_key)
        return _compiled[cache_key]

    @eqx.filter_jit
    def run(arrays, updates, state, params, kwargs):
        options = Options(eqx.combine(arrays, static))
        return build(options).update(updates, state, params, **kwargs)

    _compiled[cache_key] = run
    if len(_compiled) > _MAX_CONFIGS:
        _compiled.popitem(last=False)
    return run


def eager_cached(build: Callable) -> Callable:
    """Decorate `build(options) -> GradientTransformation`: eager `update` calls of what it
    returns run a compiled function cached per configuration (see the module docstring).

    **Arguments:**

    - `build`: takes the bound `Options` and returns an optax transformation.

    **Returns:** `build` with the same signature, whose transformation's `update` checks
    for tracers and, finding none, calls the cached compiled function.
    """

    @functools.wraps(build)
    def wrapped(options):
        tx = build(options)
        found = _config_key(options)
        if found is None:  # e.g. an unhashable callable option: cache on this instance
            jitted = eqx.filter_jit(tx.update)

            def compiled(arrays, updates, state, params, kwargs):
                del arrays
                return jitted(updates, state, params, **kwargs)
        else:
            key, static = found
            compiled = _compiled_update(build, key, static)

        arrays = eqx.filter(dict(options), eqx.is_array)

        def update(updates, state, params=None, **kwargs):
            if is_traced((updates, state, params, kwargs)):
                return tx.update(updates, state, params, **kwargs)
            updates, params, kwargs = _as_arrays((updates, params, kwargs))
            return compiled(arrays, updates, state, params, kwargs)

        return optax.GradientTransformationExtraArgs(tx.init, update)

    return wrapped
