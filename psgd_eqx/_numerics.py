"""Dtype helpers, finite guards and the data-driven init scale.

Everything here is dtype-explicit because the package runs under
`jax_numpy_dtype_promotion="strict"`: no silent bf16→f32 (or f32→f64) promotion.
"""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, PyTree

from . import _rng


def promote(*dtypes: DTypeLike) -> jnp.dtype:
    """Standard JAX type promotion of dtypes, also under the strict promotion mode.

    Used only to *choose* a dtype; every array is then cast explicitly.
    """
    with jax.numpy_dtype_promotion("standard"):
        out = jnp.dtype(dtypes[0])
        for d in dtypes[1:]:
            out = jnp.promote_types(out, d)
    return out


def compute_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The dtype the fit is computed in: at least single precision, complex kept complex.

    f64/c128 stay as they are (the user asked for them through their params); everything
    narrower is lifted to f32/c64, so bf16 Q or gradients never do the maths in bf16.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return promote(dtype, jnp.complex64)
    return promote(dtype, jnp.float32)


def real_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The real dtype matching `dtype` (f32 for c64, f64 for c128)."""
    return jnp.finfo(dtype).dtype


def storage_dtype(param_dtype: DTypeLike, precond_dtype: DTypeLike | None) -> jnp.dtype:
    """The dtype a parameter's preconditioner is stored in: the one rule that the aliases
    (which build it) and the planner (which counts its bytes) both use.

    `precond_dtype` if given, kept complex for complex params (a bf16 request for a c64
    parameter stores c64); else the params' compute dtype (≥ f32).

    **Arguments:**

    - `param_dtype`: the parameter's dtype.
    - `precond_dtype`: the user's storage dtype, or `None`.

    **Returns:** the storage dtype.
    """
    if precond_dtype is None:
        return compute_dtype(param_dtype)
    dtype = jnp.dtype(precond_dtype)
    if jnp.issubdtype(jnp.dtype(param_dtype), jnp.complexfloating):
        dtype = promote(dtype, jnp.complex64)
    return dtype


def is_complex(dtype: DTypeLike) -> bool:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating))


def abs2(x: Array) -> Array:
    """|x|² as a real array (x·conj(x) without a complex intermediate)."""
    if is_complex(x.dtype):
        return x.real * x.real + x.imag * x.imag
    return x * x


def all_finite(x: Array) -> Bool[Array, ""]:
    return jnp.all(jnp.isfinite(x))


def tree_all_finite(tree: PyTree[Array]) -> Bool[Array, ""]:
    """One scalar: every element of every leaf is finite (True for an empty tree)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([all_finite(x) for x in leaves]))


def safe_rms(x: Array) -> Float[Array, ""]:
    """Root-mean-square of `x` in f32 that neither overflows (1e30 inputs) nor divides by 0.

    The max-abs is factored out first, so squares are taken of numbers ≤ 1.
    """
    a = jnp.abs(x).astype(compute_dtype(real_dtype(x.dtype)))
    m = jnp.max(a)
    safe_m = jnp.where(m > 0, m, jnp.ones_like(m))
    return m * jnp.sqrt(jnp.mean(jnp.square(a / safe_m)))


def stochastic_round(x: Array, dtype, key) -> Array:
    """Cast `x` to `dtype`, rounding stochastically when that is bfloat16.

    f32 → bf16 keeps the top 16 bits of the f32 pattern; adding a uniform random 16-bit
    integer to the pattern first rounds up with probability equal to the dropped fraction,
    so E[round(x)] = x. Small preconditioner steps that nearest rounding would lose
    (|Δ| < half an ulp of bf16, 2⁻⁹ relative) then survive on average. Inf and NaN stay
    Inf and NaN. Any other target dtype is a plain cast.

    **Arguments:**

    - `x`: the value in single precision (or any dtype; it is cast to f32 first).
    - `dtype`: the storage dtype.
    - `key`: randomness for the rounding.

    **Returns:** `x` in `dtype`.
    """
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return x.astype(dtype)
    x32 = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x32, jnp.uint32)
    noise = _rng.bits(key, x32.shape) & jnp.uint32(0xFFFF)
    special = ~jnp.isfinite(x32)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    out = jax.lax.bitcast_convert_type(jnp.where(special, bits, rounded), jnp.float32)
    return out.astype(jnp.bfloat16)


def tree_stochastic_round(new: PyTree, like: PyTree, key) -> PyTree:
    """`stochastic_round` every array of `new` to the dtype of its twin in `like`."""
    leaves, treedef = jax.tree.flatten(new)
    likes = treedef.flatten_up_to(like)
    keys = _rng.split(key, max(len(leaves), 1))
    out = [
        stochastic_round(x, y.dtype, k) if hasattr(x, "dtype") else x
        for x, y, k in zip(leaves, likes, keys)
    ]
    return jax.tree.unflatten(treedef, out)


def tree_cast_up(tree: PyTree) -> PyTree:
    """Every floating array lifted to its compute dtype (≥ f32)."""
    return jax.tree.map(
        lambda x: x.astype(compute_dtype(x.dtype))
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
        else x,
        tree,
    )


def has_narrow_float(tree: PyTree) -> bool:
    """Whether any array of `tree` is stored in bfloat16 (where rounding matters)."""
    return any(
        hasattr(x, "dtype") and jnp.dtype(x.dtype) == jnp.dtype(jnp.bfloat16)
        for x in jax.tree.leaves(tree)
    )
