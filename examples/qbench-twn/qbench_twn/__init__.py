"""qbench-twn: Ternary Weight Networks (Li & Liu, arXiv:1605.04711) as a qbench method plugin.

The method is :class:`qbench_twn.method.TWN`, registered as ``twn`` through the entry-point
group ``qbench.methods``.
"""

__version__ = "0.1.0"
