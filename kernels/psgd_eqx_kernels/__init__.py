"""Pallas kernels for the hot paths of `psgd_eqx` (fused factor updates, Kron apply).

Empty shell for now: every op currently runs through the pure-jnp path in `psgd_eqx`.
"""

import importlib.metadata


__version__ = importlib.metadata.version("psgd_eqx")
