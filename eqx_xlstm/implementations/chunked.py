"""The chunked path: blockwise attention in XLA (`blockwise`), memory linear in S,
any mask, any platform; context-parallel when its causal inputs are sharded over the
sequence."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ..spec import AttentionSpec
from . import ring
from .base import Implementation
from .blockwise import (
    blockwise,
    from_leading_blocks,
    leading_blocks,
    piece_backward,
    piece_forward,
)
from .per_shard import per_shard
from .reference import matmul_precision


def _leading(q, spec):
    """The axes per_shard partitions over: all leading axes but grouped heads' group
    axis (q has G there, k and v 1)."""
    return q.ndim - 2 - (spec.kv_groups > 1)


def _over_sequence(spec, block, balanced):
    """per_shard's `over_sequence`: the zig-zag ring through `balanced`
    (`ring.balanced_forward` or `_backward`), first keys (segments, windows) passed
    along; None (the sequence gathered) with grouped heads, which the ring does not
    take yet."""
    if spec.kv_groups > 1:
        return None
    pieces = ring.BlockwisePieces(block)
    return lambda layout: functools.partial(balanced, spec=spec, layout=layout, pieces=pieces)


def _causal_forward(q, k, v, first_key, spec, block):
    """`(out, lse)`, per device's shard: of the leading axes, or of the sequence (the
    ring, zig-zag balanced)."""
    return per_shard(
        lambda q, k, v, *first: piece_forward(q, k, v, spec, block, *first),
        q,
        k,
        v,
        *first_key,
        batch_ndim=_leading(q, spec),
        over_sequence=_over_sequence(spec, block, ring.balanced_forward),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal(q, k, v, first_key, spec, block):
    """Causal attention; `first_key` a tuple: `(first_key,)` broadcast to q's batch
    shape (windows, segments), or empty."""
    return _causal_forward(q, k, v, first_key, spec, block)[0]


def _causal_fwd(q, k, v, first_key, spec, block):
    out, lse = _causal_forward(q, k, v, first_key, spec, block)
    return out, (q, k, v, first_key, out, lse)


def _causal_bwd(spec, block, residuals, d_out):
    q, k, v, first_key, out, lse = residuals
    grads = per_shard(
        lambda q, k, v, out, lse, d_out, *first: piece_backward(
            q, k, v, out, lse, d_out, spec, block, *first
        ),
        q,
        k,
        v,
        out,
        lse,
        d_out.astype(out.dtype),
        *first_key,
        batch_ndim=_leading(q, spec),
        over_sequence=_over_sequence(spec, block, ring.balanced_backward),
    )
    grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))
    return (*grads, tuple(None for _ in first_key))


_causal.defvjp(_causal_fwd, _causal_bwd)


@dataclasses.dataclass(frozen=True)
class Chunked(Implementation):
    """Blockwise attention in XLA with memory linear in S, any mask, any platform.

    The causal mask skips blocks above the diagonal, and with a sliding window or
    segments the blocks before the first key any query of a block sees; an explicit
    bool `(S, S)` mask is read block by block and every block is visited. Causal
    inputs sharded over the sequence axis (under `jax.jit` with `NamedSharding`s) run
    as context-parallel ring attention (`ring`), each device holding its shard, with
    segments and windows too (not yet with grouped heads: XLA then gathers the
    sequence).
    """

    name = "chunked"
    block: int = 512
    """Query and key block length (best of those measured on a 2-core CPU and an H200,
    docs/benchmarks.md)."""

    def __post_init__(self):
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"`block` must be a positive int, got {self.block!r}.")

    def unsupported(self, spec: AttentionSpec) -> str | None:
        return None

    def ring_pieces(self) -> ring.BlockwisePieces:
        return ring.BlockwisePieces(self.block)

    def __call__(self, q, k, v, spec, mask, first_key=None):
        if spec.causal:  # the pieces clamp the block
            first = () if first_key is None else (jnp.broadcast_to(first_key, q.shape[:-1]),)
            return _causal(q, k, v, first, spec, self.block)
        seq_len = spec.seq_len
        block = max(1, min(self.block, seq_len))
        qb, kb, vb = (leading_blocks(x.astype(spec.accum_dtype), block) for x in (q, k, v))
        if mask is not None:
            pad = qb.shape[0] * block - seq_len
            mask = jnp.pad(mask, ((0, pad), (0, pad)))
        out = blockwise(qb, kb, vb, mask, spec, matmul_precision(spec.dtype))
        return from_leading_blocks(out, seq_len)
