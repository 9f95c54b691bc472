"""Readers and validators of option values; imports nothing of the package.

`optax.inject_hyperparams` re-creates a transformation with array-valued (and, under `jit`,
traced) hyperparameters. Options that fix shapes or Python control flow are therefore read
once, where they are concrete (at construction or `init`), with the helpers here; a traced
value reads as `None` ("not known here") instead of raising.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray


def concrete(x):
    """`x` as a Python number if it is one or a concrete 0-d array; `None` if traced.

    **Arguments:**

    - `x`: a number, an array or a tracer.

    **Returns:** a Python scalar, or `None` when `x` is traced or not a scalar.
    """
    if isinstance(x, (bool, int, float)):
        return x
    try:
        return np.asarray(x).item()
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None
    except (TypeError, ValueError):
        return None


def concrete_or_same(x):
    """`concrete(x)` for arrays, `x` itself for anything else (Python numbers, `None`)."""
    return concrete(x) if hasattr(x, "dtype") else x


def as_key(key) -> PRNGKeyArray:
    """A PRNG key from a key or an int seed (also an int seed that `inject_hyperparams`
    turned into an array, concrete or traced)."""
    if hasattr(key, "dtype") and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jnp.ndim(key) == 0:
            return jax.random.PRNGKey(key)
        return key  # raw uint32 key data
    if isinstance(key, int):
        return jax.random.PRNGKey(key)
    return key


def check_key(key) -> None:
    """`ValueError` unless `key` is a PRNG key or an int seed."""
    if isinstance(key, bool) or (not isinstance(key, int) and not hasattr(key, "dtype")):
        raise ValueError(f"`key` must be a PRNG key or an int seed; got {key!r}.")


def check_number(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    """`ValueError` naming `name` unless `value` lies in the interval; schedules, `None`
    and traced values pass (they cannot be checked here)."""
    if callable(value) or value is None:
        return
    value = concrete(value)
    if value is None:
        return
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad or value != value:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"`{name}` must be in {lb}{lo}, {hi}{rb}; got {value!r}.")


def init_int(name: str, value, minimum: int) -> int | None:
    """An integer option as a Python int, validated; `None` while traced.

    **Arguments:**

    - `name`: the option's name, for the error message.
    - `value`: an int, an integral float, or a 0-d array of one.
    - `minimum`: the smallest allowed value.

    **Returns:** the int, or `None` if `value` is traced.
    """
    number = concrete_or_same(value)
    if number is None:
        return None
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
    return number
