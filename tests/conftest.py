import jax
import jaxtyping
import pytest


# The `--jaxtyping-packages` option in pyproject.toml instruments `psgd_eqx`. The pytest
# plugin of jaxtyping 0.3.x mis-splits a list of several packages followed by a typechecker
# with arguments, so the kernels package is hooked here, before any test imports it.
jaxtyping.install_import_hook(
    "psgd_eqx_kernels",
    "beartype.beartype(conf=beartype.BeartypeConf(strategy=beartype.BeartypeStrategy.On, is_pep484_tower=True))",  # noqa: E501
)


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    # Delayed import so that the jaxtyping import hook sees psgd_eqx first.
    import equinox.internal as eqxi

    return eqxi.GetKey()
