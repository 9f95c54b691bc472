"""PSGD for JAX: Lie-group preconditioners as Equinox modules behind optax optimizers."""

import importlib.metadata

from ._alias import (
    affine as affine,
    dense as dense,
    diag as diag,
    get_opt_state_partition_specs as get_opt_state_partition_specs,
    kron as kron,
    lra as lra,
    psgd as psgd,
    scale_by_kron as scale_by_kron,
    xmat as xmat,
)
from ._geometry import GEOMETRIES as GEOMETRIES
from ._norms import Normaliser as Normaliser
from ._numerics import (
    init_scale_from_grads as init_scale_from_grads,
    init_scale_from_hvp as init_scale_from_hvp,
)
from ._plan import (
    LeafPlan as LeafPlan,
    dense_axes as dense_axes,
    kron_plan as kron_plan,
    plan_table as plan_table,
    scanned_predicate as scanned_predicate,
)
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
from ._probe import (
    damped_probe as damped_probe,
    finite_difference_delta as finite_difference_delta,
    hessian_helper as hessian_helper,
)
from ._schedules import precond_update_prob_schedule as precond_update_prob_schedule
from ._shapes import block_pieces as block_pieces, matrix_view as matrix_view
from ._sharding import (
    precond_partition_specs as precond_partition_specs,
    state_partition_specs as state_partition_specs,
)
from ._transform import GLOBAL as GLOBAL, PSGDState as PSGDState, scale_by_psgd as scale_by_psgd


__version__ = importlib.metadata.version("psgd_eqx")
