"""The refit decision: does this step fit the preconditioners?

The caller's `update_preconditioner` wins; otherwise the schedule's probability decides,
either by a deterministic accumulator (a refit whenever the summed probability reaches 1:
the rate is exactly p, also while p anneals, with no sampling variance) or by a Bernoulli
draw. The first step always refits, and no step refits on non-finite inputs.
"""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from . import _rng


def refit_decision(
    count: Int[Array, ""],
    accumulator: Float[Array, ""],
    fit_ok: Bool[Array, ""],
    key: PRNGKeyArray,
    *,
    probability: Callable[[ArrayLike], Float[Array, ""]],
    bernoulli: bool,
    override: Bool[ArrayLike, ""] | bool | None,
) -> tuple[Bool[Array, ""], Float[Array, ""]]:
    """Whether to refit now, and the accumulator after this step.

    **Arguments:**

    - `count`: the step count before this step.
    - `accumulator`: the deterministic schedule's summed probability.
    - `fit_ok`: whether the fit inputs are finite.
    - `key`: randomness for the Bernoulli draw.
    - `probability`: the refit probability as a function of the step count.
    - `bernoulli`: draw instead of accumulating.
    - `override`: the caller's `update_preconditioner` (`None` = follow the schedule).

    **Returns:** `(do_refit, accumulator)`.
    """
    if override is not None:
        return jnp.asarray(override, bool) & fit_ok, accumulator
    prob = probability(count)
    if bernoulli:
        want = _rng.uniform(key) < prob
    else:
        accumulator = accumulator + prob
        want = accumulator >= 1.0
    do_refit = (want | (count == 0)) & fit_ok
    if not bernoulli:
        accumulator = jnp.where(do_refit, jnp.maximum(accumulator - 1.0, 0.0), accumulator)
    return do_refit, accumulator
