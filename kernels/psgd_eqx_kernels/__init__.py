"""Pallas kernels for ops of `psgd_eqx`: the Kronecker apply, fused factor updates, and the
fused refit and apply of a stack of factors (one launch each).

Each op `<op>` comes with `<op>_reference`, a pure-jnp function that defines its semantics
(and supplies its derivative: every op is a `jax.custom_jvp` whose tangent is the
reference's, since Pallas kernels cannot be differentiated). The kernels take
`backend="gpu"` (Pallas Triton) or `backend="tpu"` (Mosaic TPU) and
`interpret=False | True | pltpu.InterpretParams()`; on CPU only the interpreted modes run.

- [`eq_factor_update`][psgd_eqx_kernels.eq_factor_update]: Q − η triu(T₁ − T₂) Q. The
    only op that `psgd_eqx`'s optimizers dispatch: the dense factors of a `KronQ` with
    geometry `"EQ"`, as `use_kernels` and the platform allow (see
    [`should_use_kernel`][psgd_eqx_kernels.should_use_kernel]).
- [`pro_factor_update`][psgd_eqx_kernels.pro_factor_update]: Q − η(TQ − cQ), then one
    Procrustes step. Not dispatched by `psgd_eqx`'s optimizers (slower than XLA on an
    H100); callable directly.
- [`kron_apply`][psgd_eqx_kernels.kron_apply]: P·G = (Q_lᵀQ_l) G (Q_rᵀQ_r)ᵀ, dense or
    diagonal factors per side, optionally cached P or triangular Q. Not dispatched by
    `psgd_eqx`'s optimizers (slower than XLA on an H100); callable directly.

- [`fused_factor_refit`][psgd_eqx_kernels.fused_factor_refit]: the whole refit of a stack
    of dense factors in one launch (T₁ = y yᵀ from the probe, the norm bound, the
    Lipschitz update, the `PRO`/`EQ`/`QUAD` step, PRO's Procrustes step), each factor
    resident on chip. Dispatched by `use_kernels=True` where it fits
    ([`fused_refit_fits`][psgd_eqx_kernels.fused_refit_fits]).
- [`fused_kron_apply`][psgd_eqx_kernels.fused_kron_apply]: P·G for a stack of matrix
    gradients in one launch (dense, cached or diagonal factors per side). Dispatched by
    `use_kernels=True` where it fits ([`fused_apply_fits`][psgd_eqx_kernels.fused_apply_fits]).

The fused kernels have run in the Pallas interpreter only (GPU and TPU semantics) and
lower to Triton and Mosaic IR; they have not been timed on hardware yet, so
`use_kernels="auto"` does not pick them.

[`should_use_kernel`][psgd_eqx_kernels.should_use_kernel] says, from measurements, when a
kernel beats its reference.
"""

import importlib.metadata

from ._blocks import (
    KERNEL_MIN_N as KERNEL_MIN_N,
    BlockSizes as BlockSizes,
    default_block_sizes as default_block_sizes,
    should_use_kernel as should_use_kernel,
)
from ._eq_factor_update import (
    eq_factor_update as eq_factor_update,
    eq_factor_update_reference as eq_factor_update_reference,
)
from ._fused_apply import (
    fused_apply_fits as fused_apply_fits,
    fused_kron_apply as fused_kron_apply,
    fused_kron_apply_reference as fused_kron_apply_reference,
)
from ._fused_refit import (
    fused_factor_refit as fused_factor_refit,
    fused_factor_refit_reference as fused_factor_refit_reference,
    fused_refit_fits as fused_refit_fits,
)
from ._kron_apply import (
    kron_apply as kron_apply,
    kron_apply_reference as kron_apply_reference,
)
from ._pro_factor_update import (
    one_step_norm_bound as one_step_norm_bound,
    pro_factor_update as pro_factor_update,
    pro_factor_update_reference as pro_factor_update_reference,
)


try:
    __version__ = importlib.metadata.version("psgd_eqx")
except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
    __version__ = "0.0.0+unknown"
