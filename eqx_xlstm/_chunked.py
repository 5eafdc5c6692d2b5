"""Memory-lean blockwise attention with a recomputing backward pass.

Queries and keys are cut into blocks of `block` positions. The forward pass visits,
for each query block, the key blocks it may see (only those on or below the diagonal
when causal), keeping a running max and sum for softmax (flash-style, Dao et al. 2022)
and plain sums for sigmoid and 'none'. It stores the output and, for softmax, one
log-sum-exp per row. The backward pass (`jax.custom_vjp`) recomputes each block's
weights instead of storing S x S residuals, so memory grows linearly with S.

Works on float32 `(N, S, D)`; `chunked_attention` handles any leading axes.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _block_allowed(i, j, block, seq_len, mask):
    """Bool `(block, block)`: which (query, key) pairs of block pair (i, j) attend."""
    if mask is None:  # causal; keys past the end are padding
        q_pos = i * block + jnp.arange(block)[:, None]
        k_pos = j * block + jnp.arange(block)[None, :]
        return (k_pos <= q_pos) & (k_pos < seq_len)
    return lax.dynamic_slice(mask, (i * block, j * block), (block, block))


def _weights(scores, allowed, activation, bias, lse=None):
    """Block weights from scaled scores; exactly 0 where not allowed."""
    if activation == "softmax":
        return jnp.where(allowed, jnp.exp(jnp.where(allowed, scores, 0.0) - lse[..., None]), 0.0)
    if activation == "sigmoid":
        return jnp.where(allowed, jax.nn.sigmoid(scores + bias), 0.0)
    return jnp.where(allowed, scores, 0.0)


def _scores(q_block, k_block, scale, einsum):
    return einsum("nqd,nkd->nqk", q_block, k_block) * scale


def _forward(q, k, v, mask, activation, causal, bias, seq_len, precision):
    """q, k: (nb, N, C, D); v: (nb, N, C, DV). Returns out (nb, N, C, DV), lse (nb, N, C)."""
    n_blocks, batch, block, _ = q.shape
    scale = q.shape[-1] ** -0.5
    dv = v.shape[-1]
    einsum = functools.partial(jnp.einsum, precision=precision)

    def query_block(i):
        q_i = q[i]

        def step(j, carry):
            scores = _scores(q_i, k[j], scale, einsum)
            allowed = _block_allowed(i, j, block, seq_len, mask)
            if activation != "softmax":
                acc = carry
                p = _weights(scores, allowed, activation, bias)
                return acc + einsum("nqk,nkd->nqd", p, v[j])
            row_max, row_sum, acc = carry
            new_max = jnp.maximum(row_max, jnp.max(jnp.where(allowed, scores, -jnp.inf), -1))
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            p = _weights(scores, allowed, activation, bias, lse=shift)
            decay = jnp.where(jnp.isfinite(row_max), jnp.exp(row_max - shift), 0.0)
            row_sum = decay * row_sum + jnp.sum(p, -1)
            acc = decay[..., None] * acc + einsum("nqk,nkd->nqd", p, v[j])
            return new_max, row_sum, acc

        acc0 = jnp.zeros((batch, block, dv), jnp.float32)
        stop = i + 1 if causal else n_blocks
        if activation != "softmax":
            acc = lax.fori_loop(0, stop, step, acc0)
            return acc, jnp.zeros((batch, block), jnp.float32)
        init = (
            jnp.full((batch, block), -jnp.inf, jnp.float32),
            jnp.zeros((batch, block), jnp.float32),
            acc0,
        )
        row_max, row_sum, acc = lax.fori_loop(0, stop, step, init)
        nonempty = row_sum > 0
        out = acc / jnp.where(nonempty, row_sum, 1.0)[..., None]
        lse = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)), jnp.inf)
        return out, lse

    return lax.map(query_block, jnp.arange(n_blocks))


def _backward(q, k, v, mask, out, lse, d_out, activation, causal, bias, seq_len, precision):
    n_blocks, batch, block, _ = q.shape
    scale = q.shape[-1] ** -0.5
    einsum = functools.partial(jnp.einsum, precision=precision)
    if activation == "softmax":
        delta = jnp.sum(d_out * out, axis=-1)  # (nb, N, C)

    def key_block(dq, j):
        k_j, v_j = k[j], v[j]

        def step(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = q[i], d_out[i]
            scores = _scores(q_i, k_j, scale, einsum)
            allowed = _block_allowed(i, j, block, seq_len, mask)
            row_lse = lse[i] if activation == "softmax" else None
            p = _weights(scores, allowed, activation, bias, lse=row_lse)
            dv_j = dv_j + einsum("nqk,nqd->nkd", p, do_i)
            dp = einsum("nqd,nkd->nqk", do_i, v_j)
            if activation == "softmax":
                ds = p * (dp - delta[i][..., None])
            elif activation == "sigmoid":
                ds = dp * p * (1.0 - p)
            else:
                ds = jnp.where(allowed, dp, 0.0)
            ds = ds * scale
            dq = dq.at[i].add(einsum("nqk,nkd->nqd", ds, k_j))
            dk_j = dk_j + einsum("nqk,nqd->nkd", ds, q_i)
            return dq, dk_j, dv_j

        start = j if causal else 0
        dq, dk_j, dv_j = lax.fori_loop(
            start, n_blocks, step, (dq, jnp.zeros_like(k_j), jnp.zeros_like(v_j))
        )
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = lax.scan(key_block, jnp.zeros_like(q), jnp.arange(n_blocks))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _blockwise(q, k, v, mask, activation, causal, bias, seq_len, precision):
    return _forward(q, k, v, mask, activation, causal, bias, seq_len, precision)[0]


def _blockwise_fwd(q, k, v, mask, activation, causal, bias, seq_len, precision):
    out, lse = _forward(q, k, v, mask, activation, causal, bias, seq_len, precision)
    return out, (q, k, v, mask, out, lse)


def _blockwise_bwd(activation, causal, bias, seq_len, precision, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    dq, dk, dv = _backward(
        q, k, v, mask, out, lse, d_out, activation, causal, bias, seq_len, precision
    )
    return dq, dk, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _to_blocks(x, n_blocks, block):
    """(N, S, D) -> (nb, N, C, D), zero-padded at the end of the sequence."""
    batch, seq_len, dim = x.shape
    x = jnp.pad(x, ((0, 0), (0, n_blocks * block - seq_len), (0, 0)))
    return x.reshape(batch, n_blocks, block, dim).transpose(1, 0, 2, 3)


def chunked_attention(q, k, v, mask, activation, sigmoid_bias, block=512, precision=None):
    """Blockwise attention on `(*batch, S, D)` float arrays; returns float32.

    `mask=None` is causal (and skips blocks above the diagonal); an explicit bool
    `(S, S)` mask visits every block and reads the mask block by block.
    """
    *batch_shape, seq_len, dqk = q.shape
    dv = v.shape[-1]
    block = max(1, min(block, seq_len))
    n_blocks = -(-seq_len // block)
    flat = lambda x: x.reshape(-1, seq_len, x.shape[-1]).astype(jnp.float32)  # noqa: E731
    qb, kb, vb = (_to_blocks(flat(x), n_blocks, block) for x in (q, k, v))
    if mask is not None:
        pad = n_blocks * block - seq_len
        mask = jnp.pad(mask, ((0, pad), (0, pad)))
    out = _blockwise(
        qb, kb, vb, mask, activation, mask is None, float(sigmoid_bias), seq_len, precision
    )
    out = out.transpose(1, 0, 2, 3).reshape(-1, n_blocks * block, dv)[:, :seq_len]
    return out.reshape(*batch_shape, seq_len, dv)
