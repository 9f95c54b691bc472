"""Cheap counter-based randomness for the fits.

Every refit draws a few random arrays per preconditioner: the probe v, the start of the
norm bound's subspace iteration, the steps of a Procrustes loop, a balance decision,
stochastic-rounding bits. With JAX's default threefry each draw (and each `split`) is its
own 20-round cipher in the graph: those calls were most of a refit's compile time, three
times more under the `vmap` of a bucket. The fits therefore draw from this module
instead. A key is two uint32 words (a JAX key of any implementation is accepted and
folded to two words); the bits at position c are an integer hash of c mixed with the key
(two rounds of Wellons' `lowbias32`), a few elementwise ops that XLA fuses into one loop.

The quality is ample for what the fits need (Gaussian probes and subspace starts, coin
flips, rounding dither); it is not meant for anything else. Every draw depends only on
(key, position), so a bucket under `vmap` draws exactly what its leaves would draw one by
one. The optimizer state keeps a JAX key; each step derives the per-leaf keys from it with
one threefry `split`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, UInt32


# Distinct constants separate the streams of `split`, `fold_in` and the draws of one key.
_SPLIT = np.uint32(0x9E3779B9)
_FOLD = np.uint32(0x85EBCA6B)
_DRAW = np.uint32(0xC2B2AE35)
_NEXT = np.uint32(0x27D4EB2F)


# The hash is written with `lax` primitives rather than `jnp` operators: each `jnp`
# operator is a small jitted function whose dispatch costs far more Python time than the
# primitive when traced (under the `vmap` of a bucket, every one is batched as a nested
# jit). The hashes were a third of the update's trace time; the graph is the same.
_xor, _mul, _shr = lax.bitwise_xor, lax.mul, lax.shift_right_logical


def _mix(x: Array) -> Array:
    """lowbias32: a bijective 32-bit integer hash with good avalanche."""
    x = _xor(x, _shr(x, np.uint32(16)))
    x = _mul(x, np.uint32(0x7FEB352D))
    x = _xor(x, _shr(x, np.uint32(15)))
    x = _mul(x, np.uint32(0x846CA68B))
    return _xor(x, _shr(x, np.uint32(16)))


def words(key: ArrayLike) -> UInt32[Array, "2"]:
    """Any key (a typed JAX key, a raw uint32 key of any length, our two words) as two
    uint32 words."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    w = key.astype(jnp.uint32).reshape(-1)
    if w.shape[0] == 2:
        return w
    if w.shape[0] % 2:
        w = jnp.concatenate([w, jnp.zeros((1,), jnp.uint32)])
    pairs = w.reshape(-1, 2)
    return jax.lax.reduce(pairs, np.uint32(0), jax.lax.bitwise_xor, (0,))


def _hash(key: ArrayLike, counter: Array, stream: np.uint32) -> Array:
    w = words(key)
    w0, w1 = (lax.index_in_dim(w, i, keepdims=False) for i in (0, 1))
    return _mix(lax.add(_mix(_xor(counter, _mix(_xor(w0, stream)))), w1))


def _counter(n: int) -> Array:
    return lax.iota(np.uint32, n)


def bits(key: ArrayLike, shape: Sequence[int]) -> UInt32[Array, "..."]:
    """Uniform uint32 bits of the given shape."""
    n = math.prod(shape)
    return lax.reshape(_hash(key, _counter(n), _DRAW), tuple(shape))


def split(key: ArrayLike, num: int = 2) -> UInt32[Array, "num 2"]:
    """`num` independent keys (two words each) derived from `key`."""
    return lax.reshape(_hash(key, _counter(2 * num), _SPLIT), (num, 2))


def successor(key: ArrayLike) -> Array:
    """The key after `key`, of the same kind (a typed JAX key of any implementation, or
    raw key data of any length and dtype): what an optimizer state keeps for its next
    step. Derived with the hash rather than `jax.random.split`, whose threefry rounds are
    a compiled loop of their own in every step."""
    key = jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    new = lax.reshape(_hash(key, _counter(data.size), _NEXT), data.shape).astype(data.dtype)
    return jax.random.wrap_key_data(new, impl=jax.random.key_impl(key)) if typed else new


def fold_in(key: ArrayLike, data: ArrayLike) -> UInt32[Array, "2"]:
    """A key derived from `key` and an integer (e.g. a leaf index)."""
    d = jnp.asarray(data).astype(jnp.uint32)
    return _hash(key, jnp.stack([d, d]) * np.uint32(2) + jnp.arange(2, dtype=jnp.uint32),
                 _FOLD)


def uniform(key: ArrayLike, shape: Sequence[int] = ()) -> Float[Array, "..."]:
    """f32 uniform on [0, 1) with 24 random bits."""
    return (bits(key, shape) >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def bernoulli(key: ArrayLike, p: ArrayLike = 0.5) -> Bool[Array, ""]:
    """One coin flip, True with probability `p`."""
    return uniform(key) < jnp.asarray(p).astype(jnp.float32)


def normal(key: ArrayLike, shape: Sequence[int], dtype=jnp.float32) -> Array:
    """Standard normal samples (complex dtypes: real and imaginary parts each of variance
    1/2, as `jax.random.normal`). Drawn in f32 (f64 dtypes get f32-accurate samples)."""
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    raw = bits(key, (2, *shape) if complex_ else tuple(shape))
    # the midpoint of each of the 2²⁴ cells: u ∈ (0, 1), so erf⁻¹ stays finite
    u = lax.convert_element_type(_shr(raw, np.uint32(8)), np.float32)
    u = _mul(lax.add(u, np.float32(0.5)), np.float32(2.0 ** -24))
    z = lax.erf_inv(lax.sub(_mul(np.float32(2.0), u), np.float32(1.0)))
    z = _mul(np.float32(math.sqrt(2.0)), z)
    if complex_:
        half = np.float32(math.sqrt(0.5))
        z = jax.lax.complex(z[0] * half, z[1] * half)
    return z.astype(dtype)
