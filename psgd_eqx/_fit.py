"""The fit of the preconditioners: one Lie-group step each on a damped probe (v, h).

Every refit of a step runs inside one `lax.cond` (not one per leaf, see `_step.py`);
preconditioners of identical structure are fitted in one batched call per group
(`_bucket.py`). bf16 storage
is handled here once for every structure: the step is taken on an f32 copy and the result
rounded stochastically.
"""

import dataclasses
import functools
from collections.abc import Sequence

from jaxtyping import Array, ArrayLike, PRNGKeyArray

from . import _rng
from ._bucket import Groups
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
    k_probe, k_step, k_round = _rng.split(key, 3)
    vv, hh = damped_probe(k_probe, x, s.damping, v)
    pass_v = vv if (s.newton or q.needs_v) else None
    narrow = s.stochastic_rounding and has_narrow_float(q)
    new = (tree_cast_up(q) if narrow else q).update(
        pass_v, hh, lr=s.lr, key=k_step, normaliser=s.normaliser,
        balance_probability=s.balance_probability,
    )
    return tree_stochastic_round(new, q, k_round) if narrow else new


def fit_member(q, key: PRNGKeyArray, x: Array, v: Array | None, s: FitSettings):
    """`fit_one` for one member of a group; a group without a preconditioner of its own
    (`None`, a global-group slot) keeps what it has."""
    return fit_one(q, key, x, v, s) if isinstance(q, AbstractPrecond) else q


def refit_groups(
    preconds: tuple[list, AbstractPrecond | None],
    groups: Groups,
    keys: list,
    inputs: list,
    vectors: list,
    global_pair: tuple[Array, Array | None] | None,
    global_key: PRNGKeyArray,
    s: FitSettings,
    skip: Sequence[int] = (),
) -> tuple[list, AbstractPrecond | None]:
    """Refit every group's preconditioners (one `vmap`ped call per stacked group) and the
    global one.

    **Arguments:**

    - `preconds`: `(per-group preconditioners, None where a group has none; global one)`.
    - `groups`: the step's [`Groups`][psgd_eqx._bucket.Groups].
    - `keys`, `inputs`, `vectors`: per group, each leaf's key, fit input and Newton probe.
    - `global_pair`: the global group's concatenated `(input, probe)`, or `None`.
    - `global_key`: the global fit's key.
    - `s`: the settings.
    - `skip`: groups refitted elsewhere (owner-computes stacks with padding, `_step.py`):
        their preconditioners are returned unchanged.

    **Returns:** `(per-group preconditioners, global preconditioner)`.
    """
    qs, gq = preconds
    fit = functools.partial(fit_member, s=s)
    out = groups.map(fit, qs, keys, inputs, vectors, skip=skip)
    out = [q if g in skip else new for g, (q, new) in enumerate(zip(qs, out))]
    if gq is not None and global_pair is not None:
        gq = fit_one(gq, global_key, *global_pair, s)
    return out, gq
