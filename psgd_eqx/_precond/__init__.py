from .affine import AffineQ as AffineQ
from .base import AbstractPrecond as AbstractPrecond
from .dense import DenseQ as DenseQ
from .diag import DiagQ as DiagQ
from .kron import KronQ as KronQ
from .lra import LRAQ as LRAQ
from .stacked import StackedQ as StackedQ
from .xmat import XMatQ as XMatQ
