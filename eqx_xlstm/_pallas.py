"""Flash-style causal attention kernels in Pallas (Triton lowering): softmax, sigmoid
and 'none', with swish and RoPE applied to the q/k tiles inside the kernels.

Each query block walks the key blocks on or below the diagonal; key blocks wholly below
it skip the mask. Softmax keeps a running max and sum (in log2 units, so the kernel uses
exp2) and saves each row's log-sum-exp for the backward pass. Sigmoid attention needs
no running statistics (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention"): it just accumulates sigmoid(q k^T * scale + bias) v; 'none'
accumulates (q k^T * scale) v. The backward pass recomputes the weights block by block
in two kernels (dq over key blocks; dk, dv over query blocks), so memory stays linear
in S.

With swish/RoPE on, each program applies them to its own q (or k) block inside the
kernel and writes dq (dk) w.r.t. the raw inputs, un-rotating in the kernel too; RoPE
tables are constants (no gradient flows to them). The tiles streamed in the inner loop
come either raw and are prepared per tile (`FUSE="all"`), or already prepared
(`FUSE="outer"`: keys by one XLA pass, queries written out by the forward kernel,
which has them at hand). `FUSE="none"` (the default, measured fastest) leaves all of
it to XLA in front.

On a Hopper GPU the sigmoid/'none' forward and backward go to the Mosaic GPU kernels
of `_mosaic` and `_mosaic_backward` instead (`MOSAIC`, with swish/RoPE in front); so
does the softmax forward when no gradient is taken (under differentiation the Triton
forward runs, for the log-sum-exp its backward kernels read).
On a machine without a GPU the kernels here run in Pallas interpret mode (slow, exact).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _mosaic, _mosaic_backward, _mosaic_common
from ._pallas_tiles import (
    LOG2E,
    KernelOptions,
    allowed,
    dot,
    masked_then_full,
    prepare,
    prepare_grad,
    score_grad,
    weights,
)

# (query block, key block, warps, pipeline stages), chosen by a sweep on an H200
# (benchmarks/pallas_config_sweep.py); blocks may be any powers of two >= 16.
FWD_CONFIG = (128, 64, 8, 3)
BWD_CONFIG = (64, 64, 4, 2)
FAST_SIGMOID = True  # sigmoid via the GPU's approximate tanh (GPU only)
FUSE = "none"  # where swish + RoPE run: "all", "outer" or "none" (see above and docs)
FUSE_MODES = ("all", "outer", "none")
MOSAIC = True  # sigmoid/'none' forward and backward by Mosaic GPU kernels where they serve


def _take(refs, count):
    return (tuple(refs[:count]) if count else None), refs[count:]


def _angles(tables, start, size):
    """Rows `start .. start + size` of the (sin, cos) table refs, or None."""
    if tables is None:
        return None
    return tuple(ref[pl.ds(start, size), :] for ref in tables)


def _inner(ref, start, size, tables, o):
    """An inner-loop q/k tile, prepared here unless it comes prepared."""
    tile = ref[pl.ds(start, size), :]
    return prepare(tile, _angles(tables, start, size), o) if o.inner_fused else tile


def _fwd_kernel(*refs, o: KernelOptions, emit_q: bool):
    bq, bk = o.fwd[:2]
    (q_ref, k_ref, v_ref), rest = _take(refs, 3)
    tables, (out_ref, *extra) = _take(rest, 2 if o.rope else 0)
    i = pl.program_id(1)
    q = prepare(q_ref[...], _angles(tables, i * bq, bq), o)
    if emit_q:  # the prepared queries, for the backward pass
        extra.pop()[...] = q

    def body(j, carry, masked):
        k = _inner(k_ref, j * bk, bk, tables, o)
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = allowed(i * bq, j * bk, (bq, bk), o.seq_len) if masked else None
        if o.activation != "softmax":
            return carry + dot(weights(q, k, mask, o).astype(v.dtype), v)
        acc, m, total = carry
        scores = dot(q, k, trans_b=True) * (o.scale * LOG2E)
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        rescale = jnp.exp2(m - m_new)
        p = jnp.exp2(scores - m_new[:, None])
        acc = acc * rescale[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, total * rescale + p.sum(axis=1)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    if o.activation == "softmax":  # every causal row sees key 0, so m turns finite at once
        acc = (acc, jnp.full((bq,), -1e30, jnp.float32), jnp.zeros((bq,), jnp.float32))
    n_full, n_all = (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    acc = masked_then_full(n_full, n_all, 0, n_full, body, acc)
    if o.activation == "softmax":
        acc, m, total = acc
        extra[0][...] = m + jnp.log2(total)
        acc = acc / total[:, None]
    out_ref[...] = acc.astype(out_ref.dtype)


def _dq_kernel(*refs, o: KernelOptions):
    bq, bk = o.bwd[:2]
    (q_ref, k_ref, v_ref, do_ref), rest = _take(refs, 4)
    stats, rest = _take(rest, 2 if o.activation == "softmax" else 0)
    tables, (dq_ref,) = _take(rest, 2 if o.rope else 0)
    i = pl.program_id(1)
    q, do = prepare(q_ref[...], _angles(tables, i * bq, bq), o), do_ref[...]
    lse, delta = (stats[0][...], stats[1][...]) if stats else (None, None)

    def body(j, dq, masked):
        k = _inner(k_ref, j * bk, bk, tables, o)
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = allowed(i * bq, j * bk, (bq, bk), o.seq_len) if masked else None
        p = weights(q, k, mask, o, lse)
        ds = score_grad(dot(do, v, trans_b=True), p, mask, o, delta)
        return dq + dot((ds * o.scale).astype(k.dtype), k)

    n_full, n_all = (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    dq = masked_then_full(n_full, n_all, 0, n_full, body, jnp.zeros(q.shape, jnp.float32))
    # Raw queries and angles are loaded again rather than kept live through the loop.
    dq = prepare_grad(dq, q_ref[...], _angles(tables, i * bq, bq), o)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(*refs, o: KernelOptions, n_q_blocks: int):
    bq, bk = o.bwd[:2]
    (q_ref, k_ref, v_ref, do_ref), rest = _take(refs, 4)
    stats, rest = _take(rest, 2 if o.activation == "softmax" else 0)
    tables, (dk_ref, dv_ref) = _take(rest, 2 if o.rope else 0)
    j = pl.program_id(1)
    k, v = prepare(k_ref[...], _angles(tables, j * bk, bk), o), v_ref[...]

    def body(i, carry, masked):
        dk, dv = carry
        q = _inner(q_ref, i * bq, bq, tables, o)
        do = do_ref[pl.ds(i * bq, bq), :]
        lse, delta = (ref[pl.ds(i * bq, bq)] for ref in stats) if stats else (None, None)
        mask = allowed(i * bq, j * bk, (bq, bk), o.seq_len) if masked else None
        p = weights(q, k, mask, o, lse)
        dv = dv + dot(p.T.astype(do.dtype), do)
        ds = score_grad(dot(do, v, trans_b=True), p, mask, o, delta)
        return dk + dot((ds * o.scale).T.astype(q.dtype), q), dv

    # Query blocks that straddle the diagonal (or this key block's padding) need the
    # mask; those wholly after it do not.
    first, first_full = (j * bk) // bq, pl.cdiv((j + 1) * bk, bq)
    first_full = jnp.where((j + 1) * bk > o.seq_len, n_q_blocks, first_full)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = masked_then_full(first, first_full, first_full, n_q_blocks, body, zeros)
    dk = prepare_grad(dk, k_ref[...], _angles(tables, j * bk, bk), o)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _rows(block, dim=None):
    """The program's own block of rows of an (N, S, dim) or (N, S) array."""
    if dim is None:
        return pl.BlockSpec((None, block), lambda b, i: (b, i))
    return pl.BlockSpec((None, block, dim), lambda b, i: (b, i, 0))


def _whole(padded, dim=None):
    """The whole sequence of an (N, S, dim) or (N, S) array."""
    if dim is None:
        return pl.BlockSpec((None, padded), lambda b, i: (b, 0))
    return pl.BlockSpec((None, padded, dim), lambda b, i: (b, 0, 0))


def _table(padded, half):
    """A (S, D/2) RoPE table, shared by every program."""
    return pl.BlockSpec((padded, half), lambda b, i: (0, 0))


def _call(kernel, config, o, n_blocks, in_specs, out_specs, out_shape):
    params = None
    if not o.interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=config[2], num_stages=config[3])
    return pl.pallas_call(
        functools.partial(kernel, o=o),
        out_shape=out_shape,
        grid=(out_shape[0].shape[0], n_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=o.interpret,
        compiler_params=params,
    )


def _pre_rotated(o):
    """Whether the inner-loop operands must be prepared before the kernels run."""
    return not o.inner_fused and (o.rope or o.swish)


def _mosaic_backward_follows(o: KernelOptions) -> bool:
    """Whether the Mosaic backward kernels serve: sigmoid and 'none'. Softmax's backward
    is the Triton one, which reads the Triton forward's log-sum-exp, so under
    differentiation softmax keeps the Triton forward too."""
    return o.mosaic and o.activation != "softmax"


def _forward(q, k, v, tables, o: KernelOptions, for_grad: bool):
    """Output, softmax log-sum-exp (or None), and the inner operands of the backward
    kernels: prepared queries and keys, or the raw ones when they are prepared there."""
    (n, padded, dqk), dv = q.shape, v.shape[-1]
    bq = o.fwd[0]
    emit_q = for_grad and _pre_rotated(o)
    k_inner = prepare(k, tables or None, o, fast=False) if _pre_rotated(o) else k
    if o.mosaic and (not for_grad or _mosaic_backward_follows(o)):
        out = _mosaic.mosaic_forward(q, k, v, o.activation, o.bias, o.interpret)
        return out, None, q, k
    in_specs = [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv)]
    in_specs += [_table(padded, dqk // 2)] * len(tables)
    out_specs, out_shape = [_rows(bq, dv)], [jax.ShapeDtypeStruct((n, padded, dv), v.dtype)]
    if o.activation == "softmax":
        out_specs.append(_rows(bq))
        out_shape.append(jax.ShapeDtypeStruct((n, padded), jnp.float32))
    if emit_q:
        out_specs.append(_rows(bq, dqk))
        out_shape.append(jax.ShapeDtypeStruct(q.shape, q.dtype))
    kernel = functools.partial(_fwd_kernel, emit_q=emit_q)
    outs = _call(kernel, o.fwd, o, padded // bq, in_specs, out_specs, out_shape)(
        q, k_inner, v, *tables
    )
    lse = outs[1] if o.activation == "softmax" else None
    return outs[0], lse, (outs[-1] if emit_q else q), k_inner


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, tables, o):
    return _forward(q, k, v, tables, o, for_grad=False)[0]


def _flash_fwd(q, k, v, tables, o):
    out, lse, q_inner, k_inner = _forward(q, k, v, tables, o, for_grad=True)
    return out, (q, k, v, tables, out, lse, q_inner, k_inner)


def _flash_bwd(o, residuals, d_out):
    q, k, v, tables, out, lse, q_inner, k_inner = residuals
    if _mosaic_backward_follows(o):
        args = (q, k, v, d_out, o.activation, o.bias, o.interpret)
        if _mosaic_backward.use_fused(q.shape[-2]):
            return (*_mosaic_backward.mosaic_dkv(*args, fused=True), ())
        dq = _mosaic_backward.mosaic_dq(*args)
        dk, dvv = _mosaic_backward.mosaic_dkv(*args)
        return dq, dk, dvv, ()
    (_, padded, dqk), dv = q.shape, v.shape[-1]
    bq, bk = o.bwd[:2]
    stats, stat_rows, stat_whole = [], [], []
    if o.activation == "softmax":
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        stats, stat_rows, stat_whole = [lse, delta], [_rows(bq)] * 2, [_whole(padded)] * 2
    table_specs = [_table(padded, dqk // 2)] * len(tables)
    dq = _call(
        _dq_kernel,
        o.bwd,
        o,
        padded // bq,
        [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv), _rows(bq, dv)]
        + stat_rows
        + table_specs,
        [_rows(bq, dqk)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype)],
    )(q, k_inner, v, d_out, *stats, *tables)[0]
    dk, dvv = _call(
        functools.partial(_dkv_kernel, n_q_blocks=padded // bq),
        o.bwd,
        o,
        padded // bk,
        [_whole(padded, dqk), _rows(bk, dqk), _rows(bk, dv), _whole(padded, dv)]
        + stat_whole
        + table_specs,
        [_rows(bk, dqk), _rows(bk, dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q_inner, k, v, d_out, *stats, *tables)
    return dq, dk, dvv, tuple(jnp.zeros_like(t) for t in tables)


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(
    q, k, v, activation, sigmoid_bias, *, swish=False, sin=None, cos=None, interpret=None
):
    """Causal attention on `(*batch, S, D)` through the Pallas kernels.

    `swish` and RoPE tables `sin`, `cos` (`(S, D // 2)`, float32) are applied to q and
    k as `FUSE` says; leave them off for inputs already prepared. Returns the dtype of
    `v`. `interpret=None` interprets where there is no GPU.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    *batch_shape, seq_len, dqk = q.shape
    mosaic = (
        MOSAIC
        and not swish
        and sin is None
        and not interpret
        and _mosaic_common.unsupported(activation, q.dtype, dqk, v.shape[-1]) is None
    )
    step = math.lcm(*FWD_CONFIG[:2], *BWD_CONFIG[:2], 2 * _mosaic.BLOCK_Q, _mosaic.BLOCK_K)
    padded = -(-seq_len // step) * step

    def pad(x):
        x = x.reshape(-1, seq_len, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0)))

    tables = ()
    if sin is not None:
        tables = tuple(
            jnp.pad(jax.lax.stop_gradient(t).astype(jnp.float32), ((0, padded - seq_len), (0, 0)))
            for t in (sin, cos)
        )
    options = KernelOptions(
        activation=activation,
        bias=float(sigmoid_bias),
        scale=dqk**-0.5,
        seq_len=seq_len,
        swish=bool(swish),
        rope=bool(tables),
        inner_fused=FUSE == "all",
        mosaic=mosaic,
        fast=FAST_SIGMOID and not interpret,
        fwd=tuple(FWD_CONFIG),
        bwd=tuple(BWD_CONFIG),
        interpret=bool(interpret),
    )
    out = _flash(pad(q), pad(k), pad(v), tables, options)
    return out[:, :seq_len].reshape(*batch_shape, seq_len, v.shape[-1])
