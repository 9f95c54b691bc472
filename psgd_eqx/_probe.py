"""The fit target: how the (v, h) pair handed to a preconditioner update is made.

Whitening fits P to the gradient (or momentum) x: h = x + damping noise, v the noise
direction (integrated out by every geometry except EQ). Newton fitting takes (v, Hv) from
the caller (`Hvp=`, `vector=` extra args) and damps h the same way.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._numerics import compute_dtype, real_dtype


def damped_probe(
    key: PRNGKeyArray,
    x: Array,
    damping: float | ArrayLike = 1e-9,
    v: Array | None = None,
) -> tuple[Array, Array]:
    """Return `(v, h)` with `h = x + (δ + eps·|x|) ⊙ v`, in single precision or wider.

    The noise is computed in f32 whatever the dtype of `x` (bf16's eps = 7.8e-3 would swamp
    the signal), and `eps` is the f32 machine epsilon.

    **Arguments:**

    - `key`: randomness for v when it is not given.
    - `x`: the gradient, momentum or Hessian-vector product to fit on.
    - `damping`: the absolute damping δ (the reference's 1e-9).
    - `v`: the probe vector for Newton fitting; `None` draws v ~ N(0, I) (complex normal
        for complex `x`).

    **Returns:** `(v, h)`, both in the compute dtype (f32/c64, or f64/c128 for f64 params).
    """
    dtype = compute_dtype(x.dtype)
    x = x.astype(dtype)
    noise = jax.random.normal(key, x.shape, dtype)
    eps = jnp.finfo(real_dtype(dtype)).eps
    delta = jnp.asarray(damping, real_dtype(dtype))
    scale = (delta + eps * jnp.abs(x)).astype(dtype)
    h = x + scale * noise
    if v is None:
        return noise, h
    return v.astype(dtype), h
