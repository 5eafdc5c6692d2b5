"""Causal 'none' attention with packed documents on a Hopper GPU: the Mosaic kernels
where the documents are short, the linear form where they are long, chosen at run
time.

The kernels' time grows with the key tiles their query blocks visit (a block starts at
the tile of its first row's segment start), the linear form's with the sequence
length alone. Segment ids are data, so which is faster is only known at run time:
`mean_tiles` counts the tiles and `jax.lax.cond` runs one of the two.
"""

import dataclasses

import jax
import jax.numpy as jnp

from .. import maths
from ..spec import AttentionSpec
from .base import GROUPED, SEGMENTS, Implementation, untaken_features
from .linear import Linear
from .mosaic import Mosaic
from .mosaic.forward import BLOCK_K as TILE  # also the query block (2 x BLOCK_Q)


def _mean_tiles(first_key):
    """The mean over all rows of `first_key` (`(..., S)`, each query's first visible
    key) of the key tiles a query block visits: from the tile of its first row's first
    key to its diagonal."""
    starts = first_key[..., ::TILE]  # each block's first row
    blocks = jnp.arange(starts.shape[-1], dtype=jnp.int32)
    return jnp.mean((blocks - starts // TILE + 1).astype(jnp.float32))


@jax.custom_batching.custom_vmap
def mean_tiles(first_key):
    """`_mean_tiles`; under `jax.vmap` the mean over the mapped axis too, unmapped: one
    choice for the whole batch, so that the `lax.cond` it feeds stays a branch (with a
    mapped condition it would run both sides)."""
    return _mean_tiles(first_key)


@mean_tiles.def_vmap
def _mean_tiles_of_the_batch(axis_size, in_batched, first_key):
    del axis_size, in_batched
    return _mean_tiles(first_key), False


@dataclasses.dataclass(frozen=True)
class TilesOrLinear(Implementation):
    """Causal 'none' with `segment_ids` on a Hopper GPU (or in Mosaic GPU interpret
    mode): the `Mosaic` kernels when a query block visits at most `tiles_per_block` key
    tiles of 128 on average, else the `Linear` form; one choice per call, made at run
    time from the segment ids. The default for 'none' with segments beyond S=4096."""

    name = "tiles_or_linear"
    tiles_per_block: int | float = 12.0
    """Where the kernels stop. On an H200 (bf16, D=128, a training step) the two
    crossed between 12 and 16.5 tiles a block (documents of about 2.7k to 4k positions);
    docs/benchmarks.md, issue #10's ninth part."""

    def __post_init__(self):
        limit = self.tiles_per_block
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
            raise ValueError(f"`tiles_per_block` must be a number >= 0, got {limit!r}.")

    def unsupported(self, spec: AttentionSpec) -> str | None:
        if spec.activation != "none":
            return f"it computes activation_function='none' only, not {spec.activation!r}"
        if reason := untaken_features(spec, takes=(SEGMENTS, GROUPED)):
            return reason
        if not spec.segmented:
            return "it chooses by the segments (segment_ids), and there are none"
        return Mosaic().unsupported(spec) or Linear().unsupported(spec)

    def takes_raw(self, spec: AttentionSpec) -> bool:
        return Mosaic().takes_raw(spec)

    def __call__(self, q, k, v, spec, mask, first_key=None, rope=None):
        """As `Mosaic`'s call: `rope` when q and k come raw (the linear side then applies
        swish and RoPE first)."""
        if first_key is None:
            raise ValueError("`first_key` is needed: the choice is made from the segments.")

        def kernels(q, k, v):
            extra = {} if rope is None else {"rope": rope}
            return Mosaic()(q, k, v, spec, mask, first_key, **extra).astype(spec.dtype)

        def linear(q, k, v):
            if rope is not None:
                prepare = maths.prepare
                q, k = (prepare(x, spec.pre_activation, *rope, spec.accum_dtype) for x in (q, k))
            return Linear()(q, k, v, spec, mask, first_key).astype(spec.dtype)

        return jax.lax.cond(self.runs_kernels(first_key), kernels, linear, q, k, v)

    def runs_kernels(self, first_key) -> jax.Array:
        """Whether a call with these first keys (`maths.first_keys`) runs the kernels: a
        bool scalar, one for a whole batch (under `jax.vmap` too)."""
        return mean_tiles(first_key) <= self.tiles_per_block
