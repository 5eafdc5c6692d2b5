"""Flash-style causal attention kernels in Pallas (Triton lowering) for sigmoid and 'none'.

Sigmoid attention needs no running max or row sum (Ramapuram et al. 2024,
"Theory, Analysis, and Best Practices for Sigmoid Self-Attention"), so each query block
simply accumulates sigmoid(q k^T * scale + bias) v over the key blocks on or below the
diagonal; 'none' accumulates (q k^T * scale) v. The backward pass recomputes the weights
block by block in two kernels (dq over key blocks; dk, dv over query blocks), so memory
stays linear in S. Swish and RoPE run in front of the kernel, fused by XLA.

On a machine without a GPU the same kernels run in Pallas interpret mode (slow, exact).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK = 64


def _weights(scores, allowed, activation, bias):
    if activation == "sigmoid":
        return jnp.where(allowed, jax.nn.sigmoid(scores + bias), 0.0)
    return jnp.where(allowed, scores, 0.0)


def _allowed(q_start, k_start, block, seq_len):
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    return (k_pos <= q_pos) & (k_pos < seq_len)


def _dot(a, b, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *, activation, bias, scale, block, seq_len):
    i = pl.program_id(1)
    q = q_ref[...]

    def body(j, acc):
        k = k_ref[pl.ds(j * block, block), :]
        v = v_ref[pl.ds(j * block, block), :]
        scores = _dot(q, k, trans_b=True) * scale
        p = _weights(scores, _allowed(i * block, j * block, block, seq_len), activation, bias)
        return acc + _dot(p.astype(v.dtype), v)

    acc = jax.lax.fori_loop(0, i + 1, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, *, activation, bias, scale, block, seq_len):
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]

    def body(j, dq):
        k = k_ref[pl.ds(j * block, block), :]
        v = v_ref[pl.ds(j * block, block), :]
        allowed = _allowed(i * block, j * block, block, seq_len)
        p = _weights(_dot(q, k, trans_b=True) * scale, allowed, activation, bias)
        dp = _dot(do, v, trans_b=True)
        ds = dp * p * (1.0 - p) if activation == "sigmoid" else jnp.where(allowed, dp, 0.0)
        return dq + _dot((ds * scale).astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, i + 1, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dk_ref,
    dv_ref,
    *,
    activation,
    bias,
    scale,
    block,
    seq_len,
    n_blocks,
):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry):
        dk, dv = carry
        q = q_ref[pl.ds(i * block, block), :]
        do = do_ref[pl.ds(i * block, block), :]
        allowed = _allowed(i * block, j * block, block, seq_len)
        p = _weights(_dot(q, k, trans_b=True) * scale, allowed, activation, bias)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        dp = _dot(do, v, trans_b=True)
        ds = dp * p * (1.0 - p) if activation == "sigmoid" else jnp.where(allowed, dp, 0.0)
        dk = dk + _dot((ds * scale).T.astype(q.dtype), q)
        return dk, dv

    zeros = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(j, n_blocks, body, zeros)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(padded, block, dims):
    """A block of rows (program's block) or the whole sequence, for each (N, S, D) input."""
    row = lambda d: pl.BlockSpec((None, block, d), lambda b, i: (b, i, 0))  # noqa: E731
    whole = lambda d: pl.BlockSpec((None, padded, d), lambda b, i: (b, 0, 0))  # noqa: E731
    return row, whole


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, activation, bias, seq_len, interpret):
    return _flash_fwd(q, k, v, activation, bias, seq_len, interpret)[0]


def _flash_fwd(q, k, v, activation, bias, seq_len, interpret):
    n, padded, dqk = q.shape
    dv = v.shape[-1]
    n_blocks = padded // BLOCK
    row, whole = _specs(padded, BLOCK, None)
    kernel = functools.partial(
        _fwd_kernel, activation=activation, bias=bias, scale=dqk**-0.5, block=BLOCK, seq_len=seq_len
    )
    out = _call(
        kernel,
        (n, n_blocks),
        [row(dqk), whole(dqk), whole(dv)],
        row(dv),
        jax.ShapeDtypeStruct((n, padded, dv), v.dtype),
        interpret,
    )(q, k, v)
    return out, (q, k, v)


def _flash_bwd(activation, bias, seq_len, interpret, residuals, d_out):
    q, k, v = residuals
    n, padded, dqk = q.shape
    dv = v.shape[-1]
    n_blocks = padded // BLOCK
    row, whole = _specs(padded, BLOCK, None)
    options = dict(activation=activation, bias=bias, scale=dqk**-0.5, block=BLOCK, seq_len=seq_len)
    dq = _call(
        functools.partial(_dq_kernel, **options),
        (n, n_blocks),
        [row(dqk), whole(dqk), whole(dv), row(dv)],
        row(dqk),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
    )(q, k, v, d_out)
    dk, dvv = _call(
        functools.partial(_dkv_kernel, n_blocks=n_blocks, **options),
        (n, n_blocks),
        [whole(dqk), row(dqk), row(dv), whole(dv)],
        [row(dqk), row(dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret,
    )(q, k, v, d_out)
    return dq, dk, dvv


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q, k, v, activation, sigmoid_bias, interpret=None):
    """Causal sigmoid or 'none' attention on `(*batch, S, D)` (RoPE already applied);
    returns the dtype of `v`. `interpret=None` interprets where there is no GPU."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    *batch_shape, seq_len, dqk = q.shape
    padded = -(-seq_len // BLOCK) * BLOCK

    def prep(x):
        x = x.reshape(-1, seq_len, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0)))

    out = _flash(
        prep(q), prep(k), prep(v), activation, float(sigmoid_bias), seq_len, bool(interpret)
    )
    return out[:, :seq_len].reshape(*batch_shape, seq_len, v.shape[-1])
