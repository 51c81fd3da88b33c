"""qbench.methods: one module per paper, on the shared quantization core
(:mod:`.functional`, :mod:`.modules`, :mod:`.footprint`) and the plugin contract
(:mod:`.base`)."""

from .base import METHODS, Fit, Method, MethodContext, Paper, get_method, has_importer
from .errors import QbenchError
from .recipe import Recipe

__all__ = ["METHODS", "Fit", "Method", "MethodContext", "Paper", "QbenchError", "Recipe", "get_method", "has_importer"]
