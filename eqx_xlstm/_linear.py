"""Causal attention without an activation as chunkwise linear attention.

With weights equal to the raw logits, h_i = scale * q_i^T sum_{j<=i} k_j v_j^T. Cutting
the sequence into chunks of C positions,

    h_c = scale * (q_c @ S_c + tril(q_c @ k_c^T) @ v_c),   S_c = sum_{c' < c} k_c'^T v_c',

where the states S_c (DQK x DV) are an exclusive cumulative sum over chunks. All chunks
are computed in parallel; cost O(S * C * D + S * D^2) instead of O(S^2 * D), memory
O(S * C + S * D^2 / C). Exact, not an approximation: only the summation order differs.
"""

import functools

import jax.numpy as jnp


def linear_causal_attention(q, k, v, chunk=64, precision=None):
    """'none'-activation causal attention on `(*batch, S, D)`; returns float32.

    Matmul operands keep the input dtype (bf16 stays bf16), accumulation is float32.
    """
    *batch_shape, seq_len, dqk = q.shape
    dv = v.shape[-1]
    chunk = max(1, min(chunk, seq_len))
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len
    scale = dqk**-0.5

    def chunks(x):
        x = x.reshape(-1, seq_len, x.shape[-1])
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        return x.reshape(x.shape[0], n_chunks, chunk, x.shape[-1])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    einsum = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    kv = einsum("nckd,nckv->ncdv", kc, vc)
    # Exclusive cumulative sum: the state before each chunk.
    states = jnp.cumsum(jnp.pad(kv[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))), axis=1)
    inter = einsum("ncqd,ncdv->ncqv", qc, states.astype(qc.dtype))
    scores = einsum("ncqd,nckd->ncqk", qc, kc)
    scores = jnp.where(jnp.tril(jnp.ones((chunk, chunk), bool)), scores, 0.0)
    intra = einsum("ncqk,nckv->ncqv", scores.astype(vc.dtype), vc)
    out = (inter + intra) * scale
    out = out.reshape(-1, n_chunks * chunk, dv)[:, :seq_len]
    return out.reshape(*batch_shape, seq_len, dv)
