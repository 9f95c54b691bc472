"""The fit-input accumulator (`precond_grad_accum`): fit on the average of the inputs since
the last refit instead of the latest one. Non-finite steps are skipped, as the momentum
skips them; the sums restart after every refit."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PyTree

from ._numerics import compute_dtype


def init_fit_accum(params: PyTree) -> tuple[PyTree, Int[Array, ""]]:
    """Zero sums like `params` (in ≥ f32) and a zero count."""
    sums = jax.tree.map(lambda p: jnp.zeros(p.shape, compute_dtype(p.dtype)), params)
    return sums, jnp.zeros([], jnp.int32)


def accumulate(
    sums: list[Array], n: Int[Array, ""], inputs: list[Array], finite: Bool[Array, ""]
) -> tuple[list[Array], Int[Array, ""], list[Array]]:
    """Add this step's fit inputs.

    **Returns:** `(sums, n, averages)`: the new sums and count, and the averages to fit
    on, in the inputs' dtypes.
    """
    sums = [jnp.where(finite, s + x.astype(s.dtype), s) for s, x in zip(sums, inputs)]
    n = n + finite.astype(jnp.int32)
    denom = jnp.maximum(n, 1)
    averages = [(s / denom.astype(s.dtype)).astype(x.dtype) for s, x in zip(sums, inputs)]
    return sums, n, averages


def restart_after_refit(
    sums: list[Array], n: Int[Array, ""], do_refit: Bool[Array, ""]
) -> tuple[list[Array], Int[Array, ""]]:
    """Zero the sums and count where a refit consumed them."""
    return [jnp.where(do_refit, jnp.zeros_like(s), s) for s in sums], jnp.where(do_refit, 0, n)
