"""qbench.methods: one module per paper, on the shared quantization core
(:mod:`.functional`, :mod:`.modules`, :mod:`.footprint`) and the plugin contract
(:mod:`.base`)."""

from .base import METHODS, Method, MethodContext, Paper, get_method

__all__ = ["METHODS", "Method", "MethodContext", "Paper", "get_method"]
