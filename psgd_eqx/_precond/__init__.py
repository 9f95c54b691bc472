from .base import AbstractPrecond as AbstractPrecond
from .diag import DiagQ as DiagQ
from .kron import KronQ as KronQ
