import jax
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    # Delayed import so that the jaxtyping import hook sees psgd_eqx first.
    import equinox.internal as eqxi

    return eqxi.GetKey()
