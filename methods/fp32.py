"""Full precision (FP32): the baseline every method is compared with and starts from.

No quantization; the model trains as it is. On a GPU the runner's loop uses bf16
autocast for speed; weights are stored and counted at 32 bits.
"""

from __future__ import annotations

from .base import Method, Paper


class FP32(Method):
    name = "fp32"
    paper = Paper(
        title="Full-precision baseline",
        authors="-",
        venue="-",
        year=0,
    )
    init = "scratch"
    weight_bits = (32,)
    act_bits = (32,)
