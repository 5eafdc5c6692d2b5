"""Flash-style causal attention kernels in Pallas, lowered through Triton: softmax,
sigmoid and 'none'; also with every key visible (`spec.mask == "full"`), the
off-diagonal pieces of context-parallel attention.

Each query block walks the key blocks on or below the diagonal; key blocks wholly below
it skip the mask. Softmax keeps a running max and sum (in log2 units, so the kernel uses
exp2) and saves each row's log2-sum-exp2 for the backward pass. Sigmoid attention needs
no running statistics (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for
Sigmoid Self-Attention"): it accumulates sigmoid(q k^T * scale + bias) v; 'none'
accumulates (q k^T * scale) v. The backward pass recomputes the weights block by block
in two kernels (dq over key blocks; dk, dv over query blocks), so memory stays linear
in S. Inputs are `(N, S, D)` with S a multiple of every block size.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ... import maths
from ...spec import AttentionSpec


class Blocks(NamedTuple):
    """One kernel's launch: query and key block lengths (powers of two >= 16), warps,
    pipeline stages."""

    block_q: int
    block_k: int
    warps: int
    stages: int


class Launch(NamedTuple):
    """Static settings of one call of the kernels (hashable)."""

    spec: AttentionSpec
    forward: Blocks
    backward: Blocks
    interpret: bool

    @property
    def tanh(self):
        """The GPU's approximate tanh for sigmoid weights; exact when interpreting."""
        if self.interpret:
            return jnp.tanh
        from jax.experimental.pallas import triton as plgpu

        return plgpu.approx_tanh


def _dot(a, b, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _allowed(q_start, k_start, shape, spec: AttentionSpec):
    """The mask of one block pair: causal (or every key, for `spec.mask == "full"`),
    hiding padded keys."""
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    real = k_pos < spec.seq_len
    if not spec.causal:
        return real
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return maths.visible(q_pos, k_pos) & real


def _key_blocks(i, bq, bk, spec: AttentionSpec):
    """`(n_full, n_all)` for query block i: key blocks [0, n_full) need no mask, those
    in [n_full, n_all) do (the diagonal, or the end of the sequence)."""
    if spec.causal:
        return (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    return spec.seq_len // bk, pl.cdiv(spec.seq_len, bk)


def _weights(q, k, mask, launch: Launch, lse=None):
    """Weights of a query tile against a key tile (float32), zero where masked."""
    spec = launch.spec
    scores = _dot(q, k, trans_b=True)
    p = maths.weights(scores, spec.activation, spec.scale, spec.sigmoid_bias, lse, launch.tanh)
    return p if mask is None else jnp.where(mask, p, 0.0)


def _masked_then_full(lo_masked, hi_masked, lo_full, hi_full, body, init):
    """Run `body(j, carry, masked)` over two index ranges: first unmasked, then masked."""
    carry = jax.lax.fori_loop(lo_full, hi_full, lambda j, c: body(j, c, False), init)
    return jax.lax.fori_loop(lo_masked, hi_masked, lambda j, c: body(j, c, True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, out_ref, *lse_ref, launch: Launch):
    spec = launch.spec
    bq, bk = launch.forward.block_q, launch.forward.block_k
    i = pl.program_id(1)
    q = q_ref[...]

    def body(j, carry, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _allowed(i * bq, j * bk, (bq, bk), spec) if masked else None
        if spec.activation != "softmax":
            return carry + _dot(_weights(q, k, mask, launch).astype(v.dtype), v)
        acc, m, total = carry  # m: the running max of the logits in log2 units
        scores = _dot(q, k, trans_b=True) * (spec.scale * maths.LOG2E)
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        rescale = jnp.exp2(m - m_new)
        p = jnp.exp2(scores - m_new[:, None])
        acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, total * rescale + p.sum(axis=1)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    if spec.activation == "softmax":  # every row sees key 0, so m turns finite at once
        acc = (acc, jnp.full((bq,), -1e30, jnp.float32), jnp.zeros((bq,), jnp.float32))
    n_full, n_all = _key_blocks(i, bq, bk, spec)
    acc = _masked_then_full(n_full, n_all, 0, n_full, body, acc)
    if spec.activation == "softmax":
        acc, m, total = acc
        lse_ref[0][...] = m + jnp.log2(total)
        acc = acc / total[:, None]
    out_ref[...] = acc.astype(out_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, *refs, launch: Launch):
    spec = launch.spec
    bq, bk = launch.backward.block_q, launch.backward.block_k
    *stats, dq_ref = refs
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = (stats[0][...], stats[1][...]) if stats else (None, None)

    def body(j, dq, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _allowed(i * bq, j * bk, (bq, bk), spec) if masked else None
        p = _weights(q, k, mask, launch, lse)
        ds = maths.score_grad(_dot(do, v, trans_b=True), p, spec.activation, mask, delta)
        return dq + _dot((ds * spec.scale).astype(k.dtype), k)

    n_full, n_all = _key_blocks(i, bq, bk, spec)
    dq = _masked_then_full(n_full, n_all, 0, n_full, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, *refs, launch: Launch, n_q_blocks: int):
    spec = launch.spec
    bq, bk = launch.backward.block_q, launch.backward.block_k
    *stats, dk_ref, dv_ref = refs
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :]
        do = do_ref[pl.ds(i * bq, bq), :]
        lse, delta = (ref[pl.ds(i * bq, bq)] for ref in stats) if stats else (None, None)
        mask = _allowed(i * bq, j * bk, (bq, bk), spec) if masked else None
        p = _weights(q, k, mask, launch, lse)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        ds = maths.score_grad(_dot(do, v, trans_b=True), p, spec.activation, mask, delta)
        return dk + _dot((ds * spec.scale).T.astype(q.dtype), q), dv

    # Query blocks that straddle the diagonal (or this key block's padding) need the
    # mask; those wholly after it do not. Without the causal mask every query block
    # sees this key block.
    # (`j * 0`, not 0: Triton's loop lowering wants traced bounds here.)
    first, first_full = ((j * bk) // bq, pl.cdiv((j + 1) * bk, bq)) if spec.causal else (j * 0,) * 2
    first_full = jnp.where((j + 1) * bk > spec.seq_len, n_q_blocks, first_full)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _masked_then_full(first, first_full, first_full, n_q_blocks, body, zeros)
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


def _call(kernel, name, blocks: Blocks, launch, n_blocks, in_specs, out_specs, out_shape):
    params = None
    if not launch.interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages)
    return pl.pallas_call(
        functools.partial(kernel, launch=launch),
        out_shape=out_shape,
        grid=(out_shape[0].shape[0], n_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=launch.interpret,
        compiler_params=params,
        name=name,
    )


def forward(q, k, v, launch: Launch):
    """`(out,)`, and for softmax `(out, lse)`: each row's log2-sum-exp2 too."""
    (n, padded, dqk), dv = q.shape, v.shape[-1]
    bq = launch.forward.block_q
    in_specs = [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv)]
    out_specs, out_shape = [_rows(bq, dv)], [jax.ShapeDtypeStruct((n, padded, dv), v.dtype)]
    if launch.spec.activation == "softmax":
        out_specs.append(_rows(bq))
        out_shape.append(jax.ShapeDtypeStruct((n, padded), jnp.float32))
    outs = _call(
        _fwd_kernel,
        "triton_attention_fwd",
        launch.forward,
        launch,
        padded // bq,
        in_specs,
        out_specs,
        out_shape,
    )(q, k, v)
    return tuple(outs)


def backward(q, k, v, *outs_and_d_out, launch: Launch):
    """`(dq, dk, dv)` from the inputs, what `forward` returned, and the output's
    cotangent."""
    *outs, d_out = outs_and_d_out
    (_, padded, dqk), dv = q.shape, v.shape[-1]
    bq, bk = launch.backward.block_q, launch.backward.block_k
    stats, stat_rows, stat_whole = [], [], []
    if launch.spec.activation == "softmax":
        out, lse = outs
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        stats, stat_rows, stat_whole = [lse, delta], [_rows(bq)] * 2, [_whole(padded)] * 2
    dq = _call(
        _dq_kernel,
        "triton_attention_dq",
        launch.backward,
        launch,
        padded // bq,
        [_rows(bq, dqk), _whole(padded, dqk), _whole(padded, dv), _rows(bq, dv)] + stat_rows,
        [_rows(bq, dqk)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype)],
    )(q, k, v, d_out, *stats)[0]
    dk, dv_ = _call(
        functools.partial(_dkv_kernel, n_q_blocks=padded // bq),
        "triton_attention_dkv",
        launch.backward,
        launch,
        padded // bk,
        [_whole(padded, dqk), _rows(bk, dqk), _rows(bk, dv), _whole(padded, dv)] + stat_whole,
        [_rows(bk, dqk), _rows(bk, dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, d_out, *stats)
    return dq, dk, dv_
