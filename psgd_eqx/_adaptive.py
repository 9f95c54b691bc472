"""Adaptive refits: refit when the preconditioner has gone stale, rarely when it has not.

The fixed probability and the 1 → 0.03 anneal decide refits by the step count alone. This
schedule reads, on every step, each leaf's fit ratio r = ‖P·x‖²/n (‖P·h‖²/‖v‖² for a
Newton fit; `_diagnostics.fit_ratio`), which is 1 in expectation when P is fitted to the
current inputs. Per leaf (per layer of a scanned stack) it keeps an EMA of r (in
`PSGDState.staleness`, one array per bucket: r, not log r, is averaged, so the EMA is
unbiased at the fit), and refits at the rate

    p = floor + (ceiling − floor) · min(1, (S / tolerance)²),  S = mean |log EMA(r)|

with the same deterministic accumulator as a fixed probability (a refit whenever the
summed rate reaches 1). A fitted preconditioner has S near the EMA's noise (≈ 0.23·√(2/n)
for a leaf of n elements with β = 0.9), so it refits near `floor`; gradients that shrink,
grow or rotate away from what P was fitted to move r and the rate with it. The first step
always refits. The cost: one extra P·x per leaf per step (a refit costs several).
"""

import dataclasses

import jax.numpy as jnp
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


def init_staleness(groups: Groups, stacks: list, with_global: bool) -> tuple[Array, ...]:
    """`PSGDState.staleness` at `init`: an EMA of r = 1 per leaf (per layer of a scanned
    stack), one array per bucket (and one scalar for the global group)."""
    def shape(g, q):
        rows = (len(groups.index[g]) + groups.pads[g],) if groups.stacked(g) else ()
        return rows + ((q.shape[0],) if isinstance(q, StackedQ) else ())

    out = [jnp.ones(shape(g, q), jnp.float32) for g, q in enumerate(stacks)]
    return tuple(out + ([jnp.ones((), jnp.float32)] if with_global else []))


def update_staleness(
    schedule: AdaptiveRefits,
    groups: Groups,
    qs: list,
    old: tuple[Array, ...],
    ratios: list[Array],
    ok: Bool[Array, ""],
) -> tuple[tuple[Array, ...], Float[Array, ""]]:
    """The EMAs after this step's fit ratios (kept as they were on a step with non-finite
    inputs), and the staleness S: the mean |log EMA(r)| over every trained leaf (each layer
    of a scanned stack counts; the inert rows that pad an owner-computes stack do not).

    `ratios` is one array per bucket, then the global group's ratio if there is one.
    """
    new = tuple(jnp.where(ok & jnp.all(jnp.isfinite(r)),
                          schedule.beta * e + (1.0 - schedule.beta) * r, e)
                for e, r in zip(old, ratios))
    total, count = jnp.zeros((), jnp.float32), 0
    for g, e in enumerate(new):
        if g < len(qs) and not isinstance(qs[g], AbstractPrecond):
            continue  # no preconditioner of its own (none, or the global group's slot)
        real = e[:len(groups.index[g])] if g < len(qs) and groups.stacked(g) else e
        total, count = total + jnp.sum(jnp.abs(jnp.log(real))), count + real.size
    return new, total / max(count, 1)

