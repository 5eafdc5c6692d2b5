"""The maths of one attention head, shared by every implementation.

Each function works on plain arrays: whole `(S, S)` score matrices in the reference
path, blocks in the chunked path, tiles inside the Triton and Mosaic GPU kernels.
Scores are raw `q . k` products; the logits are `scores * scale` with
`scale = 1 / sqrt(D_qk)`.

- `visible`: which key positions a query position attends to (causal).
- `weights`: the attention weights of one activation, before masking.
- `score_grad`: the gradient w.r.t. the logits, given the gradient w.r.t. the weights.
- `swish`, `rotate_pairs`, `prepare`: what queries and keys go through first.
"""

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


def visible(query_pos, key_pos, first_key=None):
    """True where a query at `query_pos` attends to a key at `key_pos` (broadcasting):
    the causal rule, key <= query; with `first_key` (the query's first visible key,
    broadcasting like `query_pos`: a sliding window's or its segment's start), also
    key >= first_key."""
    seen = key_pos <= query_pos
    return seen if first_key is None else seen & (key_pos >= first_key)


def segment_starts(segment_ids):
    """`(..., S)` int ids -> for each position, where its segment (the run of equal
    ids it belongs to) starts."""
    positions = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    return jax.lax.cummax(jnp.where(changed, positions, 0), axis=segment_ids.ndim - 1)


def segment_positions(segment_ids):
    """Each position's offset from its segment's start: RoPE positions of packed
    sequences."""
    return jnp.arange(segment_ids.shape[-1], dtype=jnp.int32) - segment_starts(segment_ids)


def first_keys(seq_len, window=None, segment_ids=None):
    """Each query's first visible key, `(..., S)` int32: the later of its segment's
    start (`segment_ids`, `(..., S)`) and `i - window + 1`."""
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    first = jnp.zeros_like(positions)
    if segment_ids is not None:
        first = segment_starts(segment_ids)
    if window is not None:
        first = jnp.maximum(first, window_first_key(positions, window))
    return first


def window_first_key(positions, window):
    """The first key that queries at `positions` see under a sliding window of `window`
    alone: `max(0, i - window + 1)` (the Mosaic kernels compute it in place of reading
    `first_keys`)."""
    return jnp.maximum(positions - (window - 1), 0)


def key_block_reach(first_key, key_block: int, query_block: int):
    """For each row of `first_key` (`(N, S)`, non-decreasing along S) and block of
    `key_block` keys: `(whole, stop)`, `(N, S / key_block)` each, in blocks of
    `query_block` queries: the first query block with a row that does not see the
    whole key block (every earlier one's rows whose keys come after it do), and the
    block after the last with a row that sees one of its keys."""
    starts = jnp.arange(0, first_key.shape[-1], key_block, dtype=jnp.int32)
    # Unrolled: as a while loop it left the GPU idle between many tiny kernels
    # (docs/benchmarks.md, "Issue #10, fifth part").
    search = jax.vmap(
        lambda row, x: jnp.searchsorted(row, x, side="right", method="scan_unrolled"), (0, None)
    )
    whole = search(first_key, starts) // query_block
    stop = -(-search(first_key, starts + key_block - 1) // query_block)
    return whole, stop


def weights(scores, activation, scale, bias=0.0, row_stat=None, tanh=jnp.tanh):
    """Attention weights from raw scores, before masking (float32 in, float32 out).

    - `"softmax"`: `exp2(scores * scale * log2(e) - row_stat)`, where `row_stat` is
      the row's shift in log2 units of the logits: its running maximum while a
      flash-style pass accumulates, its log2-sum-exp2 once the row is complete (then
      the weights are normalised); one entry per row of `scores`, or already
      broadcast to its shape.
    - `"sigmoid"`: `sigmoid(scores * scale + bias)`.
    - `"none"`: the logits `scores * scale`.
    """
    if activation == "softmax":
        return jnp.exp2(scores * (scale * LOG2E) - _per_row(row_stat, scores))
    if activation == "sigmoid":
        # One multiply-add inside: sigmoid(s c + b) = 0.5 tanh(s c/2 + b/2) + 0.5.
        return 0.5 * tanh(scores * (0.5 * scale) + 0.5 * bias) + 0.5
    return scores * scale


def score_grad(d_weights, p, activation, allowed=None, delta=None):
    """Gradient w.r.t. the logits from `d_weights`, the gradient w.r.t. the weights
    `p` (which are zero where masked). Multiply by `scale` for the gradient w.r.t. the
    raw scores.

    Softmax needs `delta`, each row's `sum(dO * O)`. Masked entries come out zero:
    softmax and sigmoid through `p`; 'none' through `allowed` (None: nothing masked).
    """
    if activation == "softmax":
        return p * (d_weights - _per_row(delta, p))
    if activation == "sigmoid":
        return d_weights * (p - p * p)
    return d_weights if allowed is None else jnp.where(allowed, d_weights, 0.0)


def row_delta(out, d_out):
    """Softmax's `delta` for `score_grad`: each row's `sum(dO * O)`, in float32 (the
    kernels' backward passes)."""
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _per_row(stat, like):
    """A row statistic broadcast against `like`: as given where it already has `like`'s
    rank (a kernel that broadcast it in its own layout), else along a new last axis."""
    return stat if len(stat.shape) == len(like.shape) else stat[..., None]


def bias_as_feature(q, k, bias, scale):
    """`q` and `k` with one more feature each, so that `q . k * scale` gains `bias`
    (broadcasting against q's batch axes): `[q, bias / scale] . [k, 1]`. For paths that
    do not take an array bias themselves."""
    column = jnp.broadcast_to((bias / scale).astype(q.dtype)[..., None, None], (*q.shape[:-1], 1))
    ones = jnp.ones((*k.shape[:-1], 1), k.dtype)
    return jnp.concatenate([q, column], axis=-1), jnp.concatenate([k, ones], axis=-1)


def swish(x):
    """x * sigmoid(x) (also called SiLU)."""
    return x * jax.nn.sigmoid(x)


def rotate_pairs(x, sin, cos):
    """Rotate the interleaved pairs `(2i, 2i + 1)` of the last axis of `x` by
    per-position angles; `sin`, `cos`: `(S, D // 2)` for `x` of `(..., S, D)`, or with
    leading axes that broadcast against x's (per-sequence positions).

    Written as `x * cos2 + swap(x) * sin2` (`swap` exchanges each pair, the tables are
    interleaved to full width) so that XLA fuses it with neighbouring elementwise work
    into one pass over memory.
    """
    dim = x.shape[-1]
    cos2 = jnp.repeat(cos, 2, axis=-1).astype(x.dtype)  # c0 c0 c1 c1 ...
    sin2 = jnp.stack((-sin, sin), axis=-1).reshape(*sin.shape[:-1], dim).astype(x.dtype)
    swapped = x.reshape(*x.shape[:-1], dim // 2, 2)[..., ::-1].reshape(x.shape)
    return x * cos2 + swapped * sin2


def prepare(x, pre_activation, sin, cos, dtype):
    """Queries or keys as the logits see them: swish (unless `pre_activation` is
    `"none"`), then RoPE, computed in `dtype`."""
    x = x.astype(dtype)
    if pre_activation != "none":
        x = swish(x)
    return rotate_pairs(x, sin, cos)
