"""Schedules that run on device: refit probability and preconditioner learning rate."""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


def precond_update_prob_schedule(
    max_prob: float = 1.0,
    min_prob: float = 0.03,
    decay: float = 0.001,
    flat_start: int = 500,
) -> Callable[[ArrayLike], Float[Array, ""]]:
    """Anneal the preconditioner refit probability (psgd_jax's schedule, same names).

    p(t) = clip(max_prob · exp(−decay · (t − flat_start)), min_prob, max_prob): flat at
    `max_prob` for `flat_start` steps, then exponential decay to `min_prob` (with the
    defaults 1.0 → 0.03, reached around step 4,000).

    **Arguments:**

    - `max_prob`: the probability during the flat start, in (0, 1].
    - `min_prob`: the floor, in (0, max_prob].
    - `decay`: the exponential decay rate per step, ≥ 0.
    - `flat_start`: number of steps at `max_prob`, ≥ 0.

    **Returns:** a function of the step count returning the probability (f32 scalar).
    """
    if not (0.0 < max_prob <= 1.0):
        raise ValueError(f"`max_prob` must be in (0, 1]; got {max_prob!r}.")
    if not (0.0 < min_prob <= max_prob):
        raise ValueError(f"`min_prob` must be in (0, max_prob={max_prob}]; got {min_prob!r}.")
    if not decay >= 0.0:
        raise ValueError(f"`decay` must be >= 0; got {decay!r}.")
    if not flat_start >= 0:
        raise ValueError(f"`flat_start` must be >= 0; got {flat_start!r}.")

    return _Anneal(float(max_prob), float(min_prob), float(decay), int(flat_start))


@dataclasses.dataclass(frozen=True)
class _Anneal:
    """The schedule of `precond_update_prob_schedule`: a value (hashable, comparable, with
    the call that made it as its repr), so it can be a default and an eager-cache key."""

    max_prob: float
    min_prob: float
    decay: float
    flat_start: int

    def __call__(self, count: ArrayLike) -> Float[Array, ""]:
        t = jnp.asarray(count).astype(jnp.float32)
        p = self.max_prob * jnp.exp(-self.decay * (t - self.flat_start))
        return jnp.clip(p, self.min_prob, self.max_prob)

    def __repr__(self) -> str:
        return (f"precond_update_prob_schedule(max_prob={self.max_prob}, "
                f"min_prob={self.min_prob}, decay={self.decay}, "
                f"flat_start={self.flat_start})")


def as_schedule(value, name: str) -> Callable[[ArrayLike], Float[Array, ""]]:
    """A constant or a callable of the step count, validated, as a callable."""
    if callable(value):
        return lambda count: jnp.asarray(value(count), jnp.float32)
    if isinstance(value, (int, float)):
        return lambda count: jnp.asarray(value, jnp.float32)
    try:
        arr = jnp.asarray(value, jnp.float32)
    except TypeError:
        raise ValueError(f"`{name}` must be a number or a schedule; got {value!r}.") from None
    if arr.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {arr.shape}.")
    return lambda count: arr
