"""Memory-lean blockwise attention with a recomputing backward pass: the engine of the
chunked path and of the pieces of context-parallel attention.

Queries and keys are cut into blocks of `block` positions. The forward pass visits,
for each query block, the key blocks it may see (only those on or below the diagonal
when causal), keeping a running max and sum for softmax (flash-style, Dao et al. 2022)
and plain sums for sigmoid and 'none'. It stores the output and, for softmax, one
log2-sum-exp2 per row. The backward pass (`jax.custom_vjp`) recomputes each block's
weights instead of storing S x S residuals, so memory grows linearly with S.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import maths
from ..spec import AttentionSpec
from .base import from_blocks, in_blocks
from .reference import matmul_precision


def _block_allowed(i, j, block, spec, mask, first_key=None):
    """Bool `(block, block)` (with `first_key`, `(..., block, block)`): which (query,
    key) pairs of block pair (i, j) attend."""
    if mask is None:  # causal or full; keys past the end are padding
        q_pos = i * block + jnp.arange(block)[:, None]
        k_pos = j * block + jnp.arange(block)[None, :]
        first = None if first_key is None else first_key[i][..., :, None]
        if spec.mask == "full":  # with first keys: a ring piece of a window or segments
            real = jnp.broadcast_to(k_pos < spec.seq_len, (block, block))
            return real if first is None else real & (k_pos >= first)
        return maths.visible(q_pos, k_pos, first) & (k_pos < spec.seq_len)
    return lax.dynamic_slice(mask, (i * block, j * block), (block, block))


def _sum_like(x, like):
    """`x` summed over the axes where `like` has size 1 and `x` does not (grouped-query
    heads: the gradient of a key/value head shared by a group of query heads)."""
    axes = tuple(a for a in range(x.ndim) if like.shape[a] == 1 and x.shape[a] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _first_block(first_key, i, block):
    """The first key block any query of block i sees (`first_key`: each query's first
    key, non-decreasing along the sequence)."""
    return jnp.min(first_key[i][..., 0]) // block


def _last_block(first_key, j, block, n_blocks):
    """One past the last query block that sees a key of block j."""
    key_end = (j + 1) * block - 1
    seeing = jnp.max(jnp.sum(first_key <= key_end, axis=(0, -1)))  # a prefix of queries
    return jnp.minimum(n_blocks, -(-seeing // block))


def _forward(q, k, v, mask, spec, precision, first_key=None):
    """q, k: (nb, *batch, C, D); v: (nb, *batch, C, DV). Returns out (nb, *batch, C, DV)
    and each row's log2-sum-exp2 of the logits (nb, *batch, C); +inf for rows that see
    no key. `first_key`: (nb, ..., C), each query's first visible key."""
    n_blocks, *batch, block, _ = q.shape
    scale, accum = spec.scale, spec.accum_dtype
    einsum = functools.partial(jnp.einsum, precision=precision)
    softmax = spec.activation == "softmax"

    def query_block(i):
        q_i = q[i]

        def step(j, carry):
            scores = einsum("...qd,...kd->...qk", q_i, k[j])
            allowed = _block_allowed(i, j, block, spec, mask, first_key)
            if not softmax:
                p = maths.weights(scores, spec.activation, scale, spec.sigmoid_bias)
                return carry + einsum("...qk,...kd->...qd", jnp.where(allowed, p, 0.0), v[j])
            row_max, row_sum, acc = carry  # row_max: of raw scores
            new_max = jnp.maximum(row_max, jnp.max(jnp.where(allowed, scores, -jnp.inf), -1))
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = maths.weights(scores, "softmax", scale, row_stat=shift * scale * maths.LOG2E)
            p = jnp.where(allowed, p, 0.0)
            decay = jnp.where(
                jnp.isfinite(row_max), jnp.exp2((row_max - shift) * (scale * maths.LOG2E)), 0.0
            )
            row_sum = decay * row_sum + jnp.sum(p, -1)
            acc = decay[..., None] * acc + einsum("...qk,...kd->...qd", p, v[j])
            return new_max, row_sum, acc

        # Initial carries made `_like` the inputs, so that inside `shard_map` they
        # vary over the same mesh axes as the loop's results.
        rows0 = jnp.zeros_like(q_i[..., 0], dtype=accum)
        acc0 = jnp.broadcast_to(rows0[..., None], (*batch, block, v.shape[-1]))
        stop = i + 1 if spec.causal else n_blocks
        start = 0 if first_key is None else _first_block(first_key, i, block)
        if not softmax:
            return lax.fori_loop(start, stop, step, acc0), rows0
        init = (jnp.full_like(rows0, -jnp.inf), rows0, acc0)
        row_max, row_sum, acc = lax.fori_loop(start, stop, step, init)
        nonempty = row_sum > 0
        total = jnp.where(nonempty, row_sum, 1.0)
        shift = jnp.where(jnp.isfinite(row_max), row_max, 0.0) * (scale * maths.LOG2E)
        return acc / total[..., None], jnp.where(nonempty, shift + jnp.log2(total), jnp.inf)

    return lax.map(query_block, jnp.arange(n_blocks))


def _backward(q, k, v, mask, out, lse, d_out, spec, precision, first_key=None):
    n_blocks = q.shape[0]
    block = q.shape[-2]
    scale = spec.scale
    einsum = functools.partial(jnp.einsum, precision=precision)
    delta = jnp.sum(d_out * out, axis=-1) if spec.activation == "softmax" else None

    def key_block(dq, j):
        k_j, v_j = k[j], v[j]

        def step(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = q[i], d_out[i]
            scores = einsum("...qd,...kd->...qk", q_i, k_j)
            allowed = _block_allowed(i, j, block, spec, mask, first_key)
            row_lse = lse[i] if delta is not None else None
            p = maths.weights(scores, spec.activation, scale, spec.sigmoid_bias, row_lse)
            p = jnp.where(allowed, p, 0.0)
            dv_j = dv_j + _sum_like(einsum("...qk,...qd->...kd", p, do_i), dv_j)
            dp = einsum("...qd,...kd->...qk", do_i, v_j)
            row_delta = delta[i] if delta is not None else None
            ds = maths.score_grad(dp, p, spec.activation, allowed, row_delta) * scale
            dq = dq.at[i].add(einsum("...qk,...kd->...qd", ds, k_j))
            dk_j = dk_j + _sum_like(einsum("...qk,...qd->...kd", ds, q_i), dk_j)
            return dq, dk_j, dv_j

        start = j if spec.causal else 0
        stop = n_blocks if first_key is None else _last_block(first_key, j, block, n_blocks)
        dq, dk_j, dv_j = lax.fori_loop(
            start, stop, step, (dq, jnp.zeros_like(k_j), jnp.zeros_like(v_j))
        )
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros_like(q), jnp.arange(n_blocks))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise(q, k, v, mask, spec, precision):
    """Blockwise attention of `leading_blocks` inputs; `mask` the explicit mask (padded
    to whole blocks) or None."""
    return _forward(q, k, v, mask, spec, precision)[0]


def _blockwise_fwd(q, k, v, mask, spec, precision):
    out, lse = _forward(q, k, v, mask, spec, precision)
    return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(spec, precision, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    return (*_backward(q, k, v, mask, out, lse, d_out, spec, precision), None)


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def leading_blocks(x, block):
    """`(*batch, S, D)` -> `(nb, *batch, block, D)`, the layout the loops take: blocks
    first, the sequence zero-padded at the end."""
    return jnp.moveaxis(in_blocks(x, block), -3, 0)


def from_leading_blocks(x, seq_len):
    """`(nb, *batch, block, D)` from `leading_blocks`' layout back to `(*batch, S, D)`."""
    return from_blocks(jnp.moveaxis(x, 0, -3), seq_len)


def first_key_blocks(first_key, block: int, seq_len: int):
    """`(..., S)` first keys in `leading_blocks`' layout `(nb, ..., block)`; padded
    queries get `seq_len`, so they see no key."""
    if first_key is None:
        return None
    n_blocks = -(-seq_len // block)
    widths = ((0, 0),) * (first_key.ndim - 1) + ((0, n_blocks * block - seq_len),)
    padded = jnp.pad(first_key, widths, constant_values=seq_len)
    return leading_blocks(padded[..., None], block)[..., 0]


def piece_forward(q, k, v, spec: AttentionSpec, block: int, first_key=None):
    """One piece of a longer attention: `(*batch, L, D)` queries against as many keys,
    `spec.mask` `"causal"` or `"full"` (`spec.seq_len == L`); with `first_key`
    (`(..., L)`), each query's first visible key too. Returns the output (normalised
    for softmax, in `spec.accum_dtype`) and each row's log2-sum-exp2 `(*batch, L)`,
    +inf for rows that see no key (zeros unless softmax)."""
    block = max(1, min(block, spec.seq_len))
    qb, kb, vb = (leading_blocks(x.astype(spec.accum_dtype), block) for x in (q, k, v))
    fkb = first_key_blocks(first_key, block, spec.seq_len)
    out, lse = _forward(qb, kb, vb, None, spec, matmul_precision(spec.dtype), fkb)
    lse = from_leading_blocks(lse[..., None], spec.seq_len)[..., 0]
    return from_leading_blocks(out, spec.seq_len), lse


def piece_backward(q, k, v, out, lse, d_out, spec: AttentionSpec, block: int, first_key=None):
    """Gradients `(dq, dk, dv)` of one piece (as `piece_forward`'s) given the output
    and log2-sum-exp2 of the whole rows, which softmax's gradient needs."""
    block = max(1, min(block, spec.seq_len))
    accum = spec.accum_dtype
    blocks = [leading_blocks(x.astype(accum), block) for x in (q, k, v, out, d_out)]
    lse_b = leading_blocks(lse[..., None], block)[..., 0]
    fkb = first_key_blocks(first_key, block, spec.seq_len)
    qb, kb, vb, ob, dob = blocks
    precision = matmul_precision(spec.dtype)
    grads = _backward(qb, kb, vb, None, ob, lse_b, dob, spec, precision, fkb)
    return tuple(from_leading_blocks(g, spec.seq_len) for g in grads)
