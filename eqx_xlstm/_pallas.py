"""Flash-style causal attention kernels in Pallas (Triton lowering) for sigmoid and 'none'.

Sigmoid attention needs no running max or row sum (Ramapuram et al. 2024,
"Theory, Analysis, and Best Practices for Sigmoid Self-Attention"), so each query block
simply accumulates sigmoid(q k^T * scale + bias) v over the key blocks on or below the
diagonal; 'none' accumulates (q k^T * scale) v. Key blocks wholly below the diagonal
skip the mask. The backward pass recomputes the weights block by block in two kernels
(dq over key blocks; dk, dv over query blocks), so memory stays linear in S. Swish and
RoPE run in front of the kernel, fused by XLA.

On a machine without a GPU the same kernels run in Pallas interpret mode (slow, exact).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Chosen by a sweep on an H200 (benchmarks/results/h200_pallas_config_sweep.txt);
# the kernels take any multiples of 16.
BLOCK_Q = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2
FAST_SIGMOID = True  # sigmoid via the GPU's approximate tanh (GPU only)


def _sigmoid(x, fast):
    if fast:
        from jax.experimental.pallas import triton as plgpu

        return 0.5 + 0.5 * plgpu.approx_tanh(0.5 * x)
    return jax.nn.sigmoid(x)


def _weights(scores, allowed, activation, bias, fast):
    p = _sigmoid(scores + bias, fast) if activation == "sigmoid" else scores
    return p if allowed is None else jnp.where(allowed, p, 0.0)


def _allowed(q_start, k_start, shape, seq_len):
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (k_pos <= q_pos) & (k_pos < seq_len)


def _dot(a, b, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _grad_scores(dp, p, allowed, activation):
    if activation == "sigmoid":
        return dp * p * (1.0 - p)  # p is 0 where not allowed
    return dp if allowed is None else jnp.where(allowed, dp, 0.0)


def _masked_then_full(lo_masked, hi_masked, lo_full, hi_full, body, init):
    """Run `body(j, carry, masked)` over two index ranges, masked and not."""
    carry = jax.lax.fori_loop(lo_full, hi_full, lambda j, c: body(j, c, False), init)
    return jax.lax.fori_loop(lo_masked, hi_masked, lambda j, c: body(j, c, True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *, activation, bias, scale, bq, bk, seq_len, fast):
    i = pl.program_id(1)
    q = q_ref[...]

    def body(j, acc, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        allowed = _allowed(i * bq, j * bk, (bq, bk), seq_len) if masked else None
        p = _weights(_dot(q, k, trans_b=True) * scale, allowed, activation, bias, fast)
        return acc + _dot(p.astype(v.dtype), v)

    n_full, n_all = (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    acc = _masked_then_full(n_full, n_all, 0, n_full, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _dq_kernel(
    q_ref, k_ref, v_ref, do_ref, dq_ref, *, activation, bias, scale, bq, bk, seq_len, fast
):
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]

    def body(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        allowed = _allowed(i * bq, j * bk, (bq, bk), seq_len) if masked else None
        p = _weights(_dot(q, k, trans_b=True) * scale, allowed, activation, bias, fast)
        ds = _grad_scores(_dot(do, v, trans_b=True), p, allowed, activation)
        return dq + _dot((ds * scale).astype(k.dtype), k)

    n_full, n_all = (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    dq = _masked_then_full(n_full, n_all, 0, n_full, body, jnp.zeros(dq_ref.shape, jnp.float32))
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
    bq,
    bk,
    seq_len,
    fast,
    n_q_blocks,
):
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :]
        do = do_ref[pl.ds(i * bq, bq), :]
        allowed = _allowed(i * bq, j * bk, (bq, bk), seq_len) if masked else None
        p = _weights(_dot(q, k, trans_b=True) * scale, allowed, activation, bias, fast)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        ds = _grad_scores(_dot(do, v, trans_b=True), p, allowed, activation)
        return dk + _dot((ds * scale).T.astype(q.dtype), q), dv

    # Query blocks that straddle the diagonal (or this key block's padding) need the
    # mask; those wholly after it do not.
    first, first_full = (j * bk) // bq, pl.cdiv((j + 1) * bk, bq)
    first_full = jnp.where((j + 1) * bk > seq_len, n_q_blocks, first_full)
    zeros = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = _masked_then_full(first, first_full, first_full, n_q_blocks, body, zeros)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
    )


def _rows(block, dim):
    """The program's own block of rows of an (N, S, dim) array."""
    return pl.BlockSpec((None, block, dim), lambda b, i: (b, i, 0))


def _whole(padded, dim):
    """The whole sequence of an (N, S, dim) array."""
    return pl.BlockSpec((None, padded, dim), lambda b, i: (b, 0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, activation, bias, seq_len, config):
    return _flash_fwd(q, k, v, activation, bias, seq_len, config)[0]


def _options(q, activation, bias, seq_len, config):
    bq, bk, interpret = config
    fast = FAST_SIGMOID and not interpret and activation == "sigmoid"
    return dict(
        activation=activation,
        bias=bias,
        scale=q.shape[-1] ** -0.5,
        bq=bq,
        bk=bk,
        seq_len=seq_len,
        fast=fast,
    )


def _flash_fwd(q, k, v, activation, bias, seq_len, config):
    (n, padded, dqk), dv = q.shape, v.shape[-1]
    bq, bk, interpret = config
    kernel = functools.partial(_fwd_kernel, **_options(q, activation, bias, seq_len, config))
    out = _call(
        kernel,
        (n, padded // bq),
        [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv)],
        _rows(bq, dv),
        jax.ShapeDtypeStruct((n, padded, dv), v.dtype),
        interpret,
    )(q, k, v)
    return out, (q, k, v)


def _flash_bwd(activation, bias, seq_len, config, residuals, d_out):
    q, k, v = residuals
    (n, padded, dqk), dv = q.shape, v.shape[-1]
    bq, bk, interpret = config
    options = _options(q, activation, bias, seq_len, config)
    dq = _call(
        functools.partial(_dq_kernel, **options),
        (n, padded // bq),
        [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv), _rows(bq, dv)],
        _rows(bq, dqk),
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret,
    )(q, k, v, d_out)
    dk, dvv = _call(
        functools.partial(_dkv_kernel, n_q_blocks=padded // bq, **options),
        (n, padded // bk),
        [_whole(padded, dqk), _rows(bk, dqk), _rows(bk, dv), _whole(padded, dv)],
        [_rows(bk, dqk), _rows(bk, dv)],
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
    step = BLOCK_Q * BLOCK_K // _gcd(BLOCK_Q, BLOCK_K)
    padded = -(-seq_len // step) * step

    def prep(x):
        x = x.reshape(-1, seq_len, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0)))

    config = (BLOCK_Q, BLOCK_K, bool(interpret))
    out = _flash(prep(q), prep(k), prep(v), activation, float(sigmoid_bias), seq_len, config)
    return out[:, :seq_len].reshape(*batch_shape, seq_len, v.shape[-1])


def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a
