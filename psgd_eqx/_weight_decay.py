"""The tail every alias chains after its PSGD transformation: decoupled weight decay and
learning rate (θ ← θ − lr·(u + wd·θ), as `optax.adamw`)."""

import jax
import jax.numpy as jnp
import optax

from ._misc import concrete


def with_lr_and_decay(
    scale: optax.GradientTransformationExtraArgs,
    learning_rate,
    weight_decay,
    weight_decay_mask,
) -> optax.GradientTransformationExtraArgs:
    """chain(scale, [add_decayed_weights], scale_by_learning_rate).

    **Arguments:**

    - `scale`: the PSGD transformation.
    - `learning_rate`: a number or an optax schedule (≥ 0).
    - `weight_decay`, `weight_decay_mask`: as `optax.adamw` (≥ 0).

    **Returns:** the chained `optax.GradientTransformationExtraArgs`.
    """
    for name, value in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        number = None if callable(value) else concrete(value)
        if number is not None and not number >= 0:
            raise ValueError(f"`{name}` must be >= 0; got {value!r}.")
    tail = []
    tail.append(_decayed_weights(weight_decay, weight_decay_mask))
    tail.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(scale, *(_trained_leaves_only(t) for t in tail))


def _trained(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _trained_leaves_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the floating leaves; int, bool and float0 updates (the zero update PSGD
    gives a leaf that is not trained) pass through untouched, so the learning rate and
    weight decay never meet an integer."""
    tx = optax.with_extra_args_support(tx)

    def update(updates, state, params=None, **extra_args):
        keep = jax.tree.map(_trained, updates)
        if all(jax.tree.leaves(keep)):
            return tx.update(updates, state, params, **extra_args)
        sub = jax.tree.map(lambda u, k: u if k else None, updates, keep)
        sub_params = None if params is None else jax.tree.map(
            lambda p, k: p if k else None, params, keep)
        new, state = tx.update(sub, state, sub_params, **extra_args)
        return jax.tree.map(lambda u, n, k: n if k else u, updates, new, keep,
                            is_leaf=lambda x: x is None), state

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _decayed_weights(weight_decay, mask) -> optax.GradientTransformation:
    """`optax.add_decayed_weights`, skipped (no work, no params needed) for a Python 0.

    The transform is always in the chain, so a plain optimizer and one whose weight decay
    `optax.inject_hyperparams` turned into an array have the same state structure.
    """
    decay = optax.add_decayed_weights(weight_decay, mask)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        return decay

    def update(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(decay.init, update)
