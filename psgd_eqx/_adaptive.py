"""Adaptive refits: refit when the preconditioner has gone stale, rarely when it has not.

The fixed probability and the 1 → 0.03 anneal decide refits by the step count alone. This
schedule reads, on every step, each leaf's fit energies (`_diagnostics.fit_stats`): per
axis of the leaf and per index along it, Σ|P·x|² over the other axes over its value at
the fit (for whitening, the diagonal of Contract(P·x, P·x)/c, which is I when P is fitted;
for a Newton fit, the same energies of P·h over those of v). They are 1 in expectation at
the fit and move when P's scale or shape no longer matches the inputs (one row of the
gradients grown, the Hessian rotated, every gradient shrunk). Per leaf (per layer of a
scanned stack) it keeps an EMA of them (`PSGDState.staleness`, per bucket; the energies,
not their logs, are averaged, so the EMA is unbiased at the fit), and refits at the rate

    p = floor + (ceiling − floor) · min(1, (S / tolerance)²),
    S = the mean over leaves of mean |log EMA(energy)| (over axes and indices),

with the same deterministic accumulator as a fixed probability (a refit whenever the
summed rate reaches 1). A fitted preconditioner has S near the EMA's noise, so it refits
near `floor`; a stale one at the ceiling. The first step always refits. The cost: one
extra P·x per leaf per step and a few reductions (a refit costs several times that),
and Σ(axis lengths) floats of state per leaf.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ._bucket import Groups
from ._precond.base import AbstractPrecond
from ._precond.stacked import StackedQ


@dataclasses.dataclass(frozen=True)
class AdaptiveRefits:
    """The value of `adaptive_refit_schedule`: hashable and comparable, so it can be an
    eager-cache key, with the call that made it as its repr."""

    floor: float
    ceiling: float
    tolerance: float
    beta: float

    def rate(self, staleness: Float[Array, ""]) -> Float[Array, ""]:
        """The refit probability at this staleness S."""
        x = jnp.minimum(jnp.square(staleness / self.tolerance), 1.0)
        return (self.floor + (self.ceiling - self.floor) * x).astype(jnp.float32)

    def __repr__(self) -> str:
        return (f"adaptive_refit_schedule(floor={self.floor}, ceiling={self.ceiling}, "
                f"tolerance={self.tolerance}, beta={self.beta})")


def adaptive_refit_schedule(
    floor: float = 0.03,
    ceiling: float = 1.0,
    tolerance: float = 0.5,
    beta: float = 0.9,
) -> AdaptiveRefits:
    """A refit schedule driven by the fit residual: pass it as
    `preconditioner_update_probability`.

    Every step measures how far the preconditioner is from fitting the step's fit input
    (the residual ρ = log(‖P·x‖² / n) for whitening, log(‖P·h‖² / ‖v‖²) for a Newton
    fit; 0 when fitted), averages |ρ| over the parameters, smooths it over steps (an EMA
    with factor `beta`: the *staleness*) and refits at the rate
    `floor + (ceiling − floor) · min(1, (staleness / tolerance)²)`, deterministically
    (a refit whenever the summed rate reaches 1). So a stale preconditioner (gradients
    that have shrunk, grown or rotated since the last refits) is refitted every step and
    a fitted one at about `floor`. Costs one extra P·x per leaf per step.

    **Arguments:**

    - `floor`: the lowest refit rate, in (0, ceiling].
    - `ceiling`: the highest, in (0, 1].
    - `tolerance`: the staleness (mean |ρ|, > 0) at which the rate reaches `ceiling`;
        |ρ| = 0.5 is P·x off by a factor e^0.25 ≈ 1.28 in norm.
    - `beta`: the EMA factor of the staleness, in [0, 1).

    Measured (the *Diagnostics and refits* guide): at an equal number of refits a fixed
    probability did as well or better on a Kronecker quadratic, a rotating quadratic, the
    digits MLP and the delayed XOR, and kron's default anneal stays the default.

    **Returns:** the schedule, for `preconditioner_update_probability=` of `kron` or any
    alias (with `bernoulli_refit=False`, the default). A refit forced by the caller's
    `update_preconditioner=` still wins.
    """
    for name, value in (("floor", floor), ("ceiling", ceiling), ("tolerance", tolerance),
                        ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"`{name}` must be a number; got {value!r}.")
    if not (0.0 < ceiling <= 1.0):
        raise ValueError(f"`ceiling` must be in (0, 1]; got {ceiling!r}.")
    if not (0.0 < floor <= ceiling):
        raise ValueError(f"`floor` must be in (0, ceiling={ceiling}]; got {floor!r}.")
    if not tolerance > 0.0:
        raise ValueError(f"`tolerance` must be > 0; got {tolerance!r}.")
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"`beta` must be in [0, 1); got {beta!r}.")
    return AdaptiveRefits(float(floor), float(ceiling), float(tolerance), float(beta))


def _leaf_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if shape else (1,)  # a scalar leaf is one axis of one element


def init_staleness(groups: Groups, stacks: list, global_q) -> tuple:
    """`PSGDState.staleness` at `init`: `(1 − βᵗ, EMAs)` (t the number of measurements;
    the EMAs of ones would read it), the EMAs per
    bucket (then the global group, if any) and per axis of its leaves, with the bucket's
    stack rows and a scanned stack's layers in front (`()` for a bucket without a
    preconditioner of its own). They start at 0 and are read bias-corrected, as Adam's
    moments, so the first measurements count in full: an EMA started at "fitted" would
    hide a preconditioner that starts too small for many steps."""
    def one(g, q):
        if not isinstance(q, AbstractPrecond):
            return ()
        rows = (groups.size(g),) if groups.stacked(g) else ()
        if isinstance(q, StackedQ):
            rows, shape = rows + q.shape[:1], q.shape[1:]
        else:
            shape = q.shape
        return tuple(jnp.zeros(rows + (n,), jnp.float32) for n in _leaf_axes(shape))

    out = [one(g, q) for g, q in enumerate(stacks)]
    if isinstance(global_q, AbstractPrecond):  # over the flattened members: one axis
        out.append(tuple(jnp.zeros((n,), jnp.float32) for n in _leaf_axes(global_q.shape)))
    return jnp.zeros((), jnp.float32), tuple(out)


def leaf_staleness(ema: tuple[Array, ...], debias: Array) -> Array:
    """One leaf's (per layer) mean |log EMA(energy)| over its axes and indices, the EMAs
    divided by `debias` = 1 − βᵗ (0 before any measurement)."""
    if not ema:
        return jnp.zeros((), jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    safe = jnp.where(debias > 0, debias, 1.0)
    per_axis = [jnp.mean(jnp.abs(jnp.log(jnp.maximum(
        jnp.where(debias > 0, e / safe, 1.0), tiny))), axis=-1) for e in ema]
    return sum(per_axis) / len(per_axis)


def update_staleness(
    schedule: AdaptiveRefits,
    groups: Groups,
    old: tuple,
    energies: list,
    ok: Bool[Array, ""],
) -> tuple[tuple, Float[Array, ""]]:
    """The state after this step's fit energies (unchanged on a step with non-finite
    inputs), and the staleness S: the mean over every leaf with a preconditioner (each
    layer of a scanned stack counts; the inert rows that pad an owner-computes stack do
    not) of its `leaf_staleness`.

    `energies` has one entry per bucket (a tuple per axis, `()` without a preconditioner),
    then the global group's if there is one.
    """
    debias, emas = old
    good = ok & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for xs in energies
                                     for x in xs] or [True]))

    def ema(e, x):
        return jnp.where(good, schedule.beta * e + (1.0 - schedule.beta) * x, e)

    new = tuple(tuple(ema(e, x) for e, x in zip(es, xs)) for es, xs in zip(emas, energies))
    # 1 − βᵗ after one more measurement is β·(1 − βᵗ⁻¹) + (1 − β): the EMA of ones
    debias = jnp.where(good, schedule.beta * debias + (1.0 - schedule.beta), debias)
    total, count = jnp.zeros((), jnp.float32), 0
    for g, es in enumerate(new):
        if not es:
            continue
        per_leaf = leaf_staleness(es, debias)
        if g < len(groups.index) and groups.stacked(g) and groups.pads[g]:
            per_leaf = per_leaf[np.asarray(groups.slots[g])]  # the members' rows
        total, count = total + jnp.sum(per_leaf), count + per_leaf.size
    return (debias, new), total / max(count, 1)
