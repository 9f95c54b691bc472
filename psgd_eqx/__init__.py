"""PSGD for JAX: Lie-group preconditioners as Equinox modules behind optax optimizers."""

import importlib.metadata

from ._alias import kron as kron, scale_by_kron as scale_by_kron
from ._geometry import GEOMETRIES as GEOMETRIES
from ._norms import Normaliser as Normaliser
from ._numerics import init_scale_from_grads as init_scale_from_grads
from ._plan import dense_axes as dense_axes, kron_plan as kron_plan, LeafPlan as LeafPlan
from ._precond import AbstractPrecond as AbstractPrecond, DiagQ as DiagQ, KronQ as KronQ
from ._probe import damped_probe as damped_probe
from ._schedules import precond_update_prob_schedule as precond_update_prob_schedule
from ._transform import PSGDState as PSGDState, scale_by_psgd as scale_by_psgd


__version__ = importlib.metadata.version("psgd_eqx")
