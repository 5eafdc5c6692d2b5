"""Causal attention through flash-style Pallas kernels lowered by Triton."""

import dataclasses
import functools
import math
from collections.abc import Sequence

from ...spec import AttentionSpec
from ..base import Implementation
from ..per_shard import RowKernels, row_attention
from . import kernels
from .kernels import Blocks, Launch


@dataclasses.dataclass(frozen=True)
class Triton(Implementation):
    """Flash-style Pallas kernels (Triton lowering) for causal softmax, sigmoid and
    'none': a forward kernel and two backward ones (dQ; dK and dV). float16/bfloat16 on
    an NVIDIA GPU; elsewhere Pallas interpret mode (slow, exact; how CI tests them).

    Defaults: the fastest blocks of a sweep on an H200 (benchmarks/pallas_config_sweep.py,
    docs/benchmarks.md).
    """

    name = "triton"
    forward: Sequence[int] = Blocks(block_q=128, block_k=64, warps=8, stages=3)
    """The forward kernel's `Blocks` (block_q, block_k, warps, stages); a plain tuple
    or list of four ints is taken as one."""
    backward: Sequence[int] = Blocks(block_q=64, block_k=64, warps=4, stages=2)
    """The same for the two backward kernels."""

    def __post_init__(self):
        for field in ("forward", "backward"):
            blocks = Blocks(*getattr(self, field))  # from a list too (checkpoint headers)
            if any(not isinstance(b, int) or b < 16 or b & (b - 1) for b in blocks[:2]):
                raise ValueError(
                    f"`{field}` block lengths must be powers of two >= 16, got {blocks[:2]}."
                )
            object.__setattr__(self, field, blocks)

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if not spec.causal:
            return "it is used with the causal mask only (attention_mask=None)"
        if spec.dqk % 16 or spec.dv % 16 or max(spec.dqk, spec.dv) > 256:
            return (
                f"it needs head dims that are multiples of 16 and <= 256, got {spec.dqk}/{spec.dv}"
            )
        if spec.platform == "gpu":
            if not spec.half:
                return f"on a GPU it needs float16 or bfloat16 inputs, got {spec.dtype}"
            if spec.dqk & (spec.dqk - 1) or spec.dv & (spec.dv - 1):
                return f"on a GPU it needs power-of-two head dims, got {spec.dqk}/{spec.dv}"
        elif spec.dtype.itemsize > 4:
            return f"its kernels accumulate in float32, so they do not take {spec.dtype}"
        return None

    def __call__(self, q, k, v, spec, mask):
        step = math.lcm(*self.forward[:2], *self.backward[:2])
        launch = Launch(spec, self.forward, self.backward, interpret=spec.platform != "gpu")
        row_kernels = RowKernels(
            forward=functools.partial(kernels.forward, launch=launch),
            backward=functools.partial(kernels.backward, launch=launch),
            spec=spec,
            multiple=step,
        )
        return row_attention(row_kernels, q, k, v)
