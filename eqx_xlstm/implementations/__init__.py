"""The attention implementations: each a frozen `Implementation` whose fields are its
tuning, which says why it cannot serve a call (`unsupported`) or runs it.

`eqx_xlstm.dispatch` holds the table that picks one; pass an instance as
`attention(..., implementation=...)` to run one with other settings, e.g.
`Chunked(block=256)`.
"""

from .base import Implementation
from .chunked import Chunked
from .cudnn import CuDNN
from .linear import Linear
from .mosaic import Mosaic
from .reference import Reference
from .tiles_or_linear import TilesOrLinear
from .triton import Triton
from .triton.kernels import Blocks as TritonBlocks

__all__ = [
    "Chunked",
    "CuDNN",
    "Implementation",
    "Linear",
    "Mosaic",
    "Reference",
    "TilesOrLinear",
    "Triton",
    "TritonBlocks",
]
