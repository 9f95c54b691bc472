"""The fit of the preconditioners: one Lie-group step each on a damped probe (v, h).

Every refit of a step runs inside one `lax.cond` (not one per leaf); preconditioners of
identical structure are fitted in one batched call per bucket (`_bucket.py`). bf16 storage
is handled here once for every structure: the step is taken on an f32 copy and the result
rounded stochastically.
"""

import dataclasses
from collections.abc import Callable

import jax
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from . import _global
from ._bucket import bucketed_map
from ._norms import Normaliser
from ._numerics import has_narrow_float, tree_cast_up, tree_stochastic_round
from ._precond.base import AbstractPrecond
from ._probe import damped_probe


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """What one refit needs besides the preconditioner and its inputs."""

    newton: bool
    damping: ArrayLike
    lr: ArrayLike
    normaliser: Normaliser
    balance_probability: ArrayLike
    stochastic_rounding: bool


def fit_one(
    q: AbstractPrecond, key: PRNGKeyArray, x: Array, v: Array | None, s: FitSettings
) -> AbstractPrecond:
    """One fitting step of `q` on the input `x` (gradient, momentum or Hv) and probe `v`.

    **Arguments:**

    - `q`: the preconditioner.
    - `key`: randomness for the probe, the step and the rounding.
    - `x`: the fit input; `v`: the Newton probe, or `None` (whitening: v is drawn).
    - `s`: the settings.

    **Returns:** the refitted preconditioner (same dtypes as `q`).
    """
    k_probe, k_step, k_round = jax.random.split(key, 3)
    vv, hh = damped_probe(k_probe, x, s.damping, v)
    pass_v = vv if (s.newton or q.needs_v) else None
    narrow = s.stochastic_rounding and has_narrow_float(q)
    new = (tree_cast_up(q) if narrow else q).update(
        pass_v, hh, lr=s.lr, key=k_step, normaliser=s.normaliser,
        balance_probability=s.balance_probability,
    )
    return tree_stochastic_round(new, q, k_round) if narrow else new


def refit_all(
    preconds: tuple[list, AbstractPrecond | None],
    key: PRNGKeyArray,
    inputs: list[Array],
    vectors: list,
    members: list[int],
    s: FitSettings,
    bucket: bool,
) -> tuple[list, AbstractPrecond | None]:
    """Refit every per-leaf preconditioner (bucketed when `bucket`) and the global one.

    **Returns:** `(per-leaf preconditioners, global preconditioner)`.
    """
    qs, gq = preconds
    keys = jax.random.split(key, len(qs) + 1)
    items = [
        None if q is None else (q, keys[i], x, v)
        for i, (q, x, v) in enumerate(zip(qs, inputs, vectors))
    ]
    out = bucketed_map(lambda q, k, x, v: fit_one(q, k, x, v, s), items, bucket)
    if gq is not None:
        x = _global.concat([inputs[i] for i in members])
        v = None if not s.newton else _global.concat([vectors[i] for i in members])
        gq = fit_one(gq, keys[-1], x, v, s)
    return out, gq


def maybe_refit(
    do_refit, preconds: tuple[list, AbstractPrecond | None], refit: Callable
) -> tuple[list, AbstractPrecond | None]:
    """`refit(preconds)` under one `lax.cond` on `do_refit`."""
    qs, gq = preconds
    return jax.lax.cond(do_refit, refit, lambda x: (list(x[0]), x[1]), (list(qs), gq))
