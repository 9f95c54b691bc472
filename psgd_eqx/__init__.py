"""PSGD for JAX: Lie-group preconditioners as Equinox modules behind optax optimizers."""

import importlib as _importlib
import importlib.metadata as _metadata
import warnings as _warnings

from ._adaptive import adaptive_refit_schedule as adaptive_refit_schedule
from ._alias import (
    affine as affine,
    dense as dense,
    diag as diag,
    lra as lra,
    psgd as psgd,
    xmat as xmat,
)
from ._diagnostics import LeafDiagnostics as LeafDiagnostics
from ._geometry import GEOMETRIES as GEOMETRIES
from ._kron import (
    get_opt_state_partition_specs as get_opt_state_partition_specs,
    kron as kron,
    scale_by_kron as scale_by_kron,
)
from ._layout import LeafBuckets as LeafBuckets
from ._norms import Normaliser as Normaliser
from ._plan import LeafPlan as LeafPlan, kron_plan as kron_plan, plan_table as plan_table
from ._plot import plot_diagnostics as plot_diagnostics
from ._precond import (
    LRAQ as LRAQ,
    AbstractPrecond as AbstractPrecond,
    AffineQ as AffineQ,
    BlockedQ as BlockedQ,
    DenseQ as DenseQ,
    DiagQ as DiagQ,
    KronQ as KronQ,
    StackedQ as StackedQ,
    XMatQ as XMatQ,
)
from ._probe import hessian_helper as hessian_helper
from ._relayout import relayout_owner_state as relayout_owner_state
from ._report import diagnostics as diagnostics
from ._schedules import precond_update_prob_schedule as precond_update_prob_schedule
from ._sharding import (
    precond_partition_specs as precond_partition_specs,
    state_partition_specs as state_partition_specs,
)
from ._transform import GLOBAL as GLOBAL, PSGDState as PSGDState, scale_by_psgd as scale_by_psgd


__version__ = _metadata.version("psgd_eqx")

# Internals that were top-level names before 0.2: still reachable (with a warning) so code
# that imported them keeps running, but no longer part of the documented surface.
_MOVED = {
    "block_pieces": "psgd_eqx._shapes",
    "matrix_view": "psgd_eqx._shapes",
    "dense_axes": "psgd_eqx._plan",
    "scanned_predicate": "psgd_eqx._plan",
    "damped_probe": "psgd_eqx._probe",
    "finite_difference_delta": "psgd_eqx._probe",
    "init_scale_from_grads": "psgd_eqx._init_scale",
    "init_scale_from_hvp": "psgd_eqx._init_scale",
}


def __getattr__(name: str):
    if name in _MOVED:
        _warnings.warn(
            f"`psgd_eqx.{name}` is an internal helper and no longer a public name; import it "
            f"from `{_MOVED[name]}` if you need it (it may change without notice).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'psgd_eqx' has no attribute {name!r}")
