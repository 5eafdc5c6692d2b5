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

Bounded specs (segments, sliding windows) also take each query's first visible key,
`(N_kv, S)`, non-decreasing along S: a query block starts at the key block of its
rows' smallest first key, and a key block's dk/dv stop at the last query block that
sees it (`key_block_ranges`, computed in XLA). With grouped-query heads (G =
`spec.kv_groups`) q has `N_kv G` rows, G per KV row: the forward and dq kernels read
their KV row `b // G`, and the dk/dv kernel walks every group's queries for its KV
block, so shared keys and values are never repeated in memory.
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
    pieces_first_keys: bool = False
    """First keys for a piece of context-parallel attention (whose spec has no
    segments or window: a full piece cannot)."""

    @property
    def takes_first_keys(self) -> bool:
        """Whether the kernels take each query's first visible key."""
        return self.spec.bounded or self.pieces_first_keys

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


def _allowed(q_start, k_start, shape, spec: AttentionSpec, first_key=None):
    """The mask of one block pair: causal (or every key, for `spec.mask == "full"`),
    hiding padded keys; with `first_key` (the block's queries', `(bq,)`), also the keys
    before each query's first."""
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    real = k_pos < spec.seq_len
    first = None if first_key is None else first_key[:, None]
    if not spec.causal:
        return real if first is None else real & (k_pos >= first)
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return maths.visible(q_pos, k_pos, first) & real


def _key_ranges(i, bq, bk, spec: AttentionSpec, first_key=None):
    """The key blocks query block i visits, as `(start, stop, masked)` ranges: the
    causal ones need no mask below the diagonal; with `first_key` (the block's
    queries'), they start at the first key block any of them sees, masked until the
    last of their first keys. Without the causal mask (a piece of context-parallel
    attention), every key block, from that first one."""
    if not spec.causal:
        whole, n_all = spec.seq_len // bk, pl.cdiv(spec.seq_len, bk)
        if first_key is None:
            return [(i * 0, whole, False), (whole, n_all, True)]
        lo = jnp.min(first_key)  # rows of a piece that see none of its keys: seq_len
        start = jnp.where(lo >= spec.seq_len, n_all, lo // bk)
        padding = jnp.maximum(whole, start)  # the block with padded keys, if any
        unmasked = jnp.clip(pl.cdiv(jnp.max(first_key), bk), start, padding)
        return [(start, unmasked, True), (unmasked, padding, False), (padding, n_all, True)]
    n_full, n_all = (i * bq) // bk, pl.cdiv((i + 1) * bq, bk)
    if first_key is None:
        return [(i * 0, n_full, False), (n_full, n_all, True)]
    start = jnp.min(first_key) // bk
    unmasked = jnp.clip(pl.cdiv(jnp.max(first_key), bk), start, n_full)
    return [(start, unmasked, True), (unmasked, n_full, False), (n_full, n_all, True)]


def key_block_ranges(first_key, seq_len: int, bq: int, bk: int, causal: bool = True):
    """The query blocks the dk/dv kernel visits for each KV row and key block j,
    `(N_kv, n_kb, 4)` int32 `(a, b, stop, start)`: masked in `[start, a)` (the
    diagonal, padded keys) and `[b, stop)` (queries whose first key falls inside block
    j), unmasked in `[a, b)`; from `stop` on no query sees block j. `start` is the
    diagonal's query block `j bk // bq`, or 0 without the causal mask (`causal`
    False: a piece of context-parallel attention). `first_key`: `(N_kv, S')`, padded,
    non-decreasing along S'."""
    starts = jnp.arange(0, first_key.shape[-1], bk, dtype=jnp.int32)
    # A row whose first key is past the real keys (a piece's row that sees none of
    # them) sees no key block.
    first_key = jnp.where(first_key >= seq_len, jnp.iinfo(jnp.int32).max, first_key)
    whole, stop = maths.key_block_reach(first_key, bk, bq)
    start = starts // bq if causal else jnp.zeros_like(starts)
    past_diagonal = jnp.minimum(pl.cdiv(starts + bk, bq) if causal else start, stop)
    past_diagonal = jnp.where(starts + bk > seq_len, stop, past_diagonal)
    unmasked_stop = jnp.clip(whole, past_diagonal, stop)
    start = jnp.broadcast_to(start, stop.shape)
    return jnp.stack([past_diagonal, unmasked_stop, stop, start], axis=-1).astype(jnp.int32)


def _weights(q, k, mask, launch: Launch, lse=None, bias=None):
    """Weights of a query tile against a key tile (float32), zero where masked; `bias`:
    the tile's rows' sigmoid bias, `(bq,)`, when it is an array (`spec.array_bias`)."""
    spec = launch.spec
    scores = _dot(q, k, trans_b=True)
    bias = spec.sigmoid_bias if bias is None else bias[:, None]
    p = maths.weights(scores, spec.activation, spec.scale, bias, lse, launch.tanh)
    return p if mask is None else jnp.where(mask, p, 0.0)


def _over_ranges(ranges, body, carry):
    """Run `body(j, carry, masked)` over each `(start, stop, masked)` range in turn."""
    for start, stop, masked in ranges:
        carry = jax.lax.fori_loop(start, stop, functools.partial(_masked_step, body, masked), carry)
    return carry


def _masked_step(body, masked, j, carry):
    return body(j, carry, masked)


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, launch: Launch):
    spec, bounded = launch.spec, launch.takes_first_keys
    first_key = refs[0][...] if bounded else None
    bias = refs[bounded][...] if spec.array_bias else None
    out_ref, *lse_ref = refs[bounded + spec.array_bias :]
    bq, bk = launch.forward.block_q, launch.forward.block_k
    i = pl.program_id(1)
    q = q_ref[...]

    def body(j, carry, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _allowed(i * bq, j * bk, (bq, bk), spec, first_key) if masked else None
        if spec.activation != "softmax":
            return carry + _dot(_weights(q, k, mask, launch, bias=bias).astype(v.dtype), v)
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
    if spec.activation == "softmax":  # a finite floor: rows masked in a block stay at 0
        acc = (acc, jnp.full((bq,), -1e30, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc = _over_ranges(_key_ranges(i, bq, bk, spec, first_key), body, acc)
    if spec.activation == "softmax":
        acc, m, total = acc
        lse_ref[0][...] = m + jnp.log2(total)  # -inf for a row that saw no key
        acc = acc / jnp.where(total > 0, total, 1.0)[:, None]  # such a row (in a piece): 0
    out_ref[...] = acc.astype(out_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, *refs, launch: Launch):
    spec = launch.spec
    bq, bk = launch.backward.block_q, launch.backward.block_k
    bounded = launch.takes_first_keys
    first_key = refs[0][...] if bounded else None
    bias = refs[bounded][...] if spec.array_bias else None
    *stats, dq_ref = refs[bounded + spec.array_bias : len(refs) - spec.array_bias]
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = (stats[0][...], stats[1][...]) if stats else (None, None)

    def body(j, carry, masked):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        mask = _allowed(i * bq, j * bk, (bq, bk), spec, first_key) if masked else None
        p = _weights(q, k, mask, launch, lse, bias)
        ds = maths.score_grad(_dot(do, v, trans_b=True), p, spec.activation, mask, delta)
        dq = carry[0] + _dot((ds * spec.scale).astype(k.dtype), k)
        if spec.array_bias:  # the bias's gradient: the logits', summed over keys
            return dq, carry[1] + ds.sum(axis=1)
        return (dq,)

    ranges = _key_ranges(i, bq, bk, spec, first_key)
    init = (jnp.zeros(q.shape, jnp.float32),)
    if spec.array_bias:
        init += (jnp.zeros((bq,), jnp.float32),)
    dq, *d_bias = _over_ranges(ranges, body, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if spec.array_bias:
        refs[-1][...] = d_bias[0]


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, *refs, launch: Launch, n_q_blocks: int):
    """dk and dv of one KV block, over the query blocks of every group (G of them,
    `n_q_blocks` each, one after another along the rows of q)."""
    spec = launch.spec
    bq, bk = launch.backward.block_q, launch.backward.block_k
    bounded = launch.takes_first_keys
    first_key_ref, block_ranges = (refs[0], refs[1][...]) if bounded else (None, None)
    bias_ref = refs[2 * bounded] if spec.array_bias else None
    *stats, dk_ref, dv_ref = refs[2 * bounded + spec.array_bias :]
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]

    def body(i, carry, masked, group):
        dk, dv = carry
        rows = pl.ds(group * n_q_blocks * bq + i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = (ref[rows] for ref in stats) if stats else (None, None)
        bias = None if bias_ref is None else bias_ref[rows]
        first_key = None
        if masked and bounded:
            first_key = first_key_ref[pl.ds(i * bq, bq)]
        mask = _allowed(i * bq, j * bk, (bq, bk), spec, first_key) if masked else None
        p = _weights(q, k, mask, launch, lse, bias)
        dv = dv + _dot(p.T.astype(do.dtype), do)
        ds = maths.score_grad(_dot(do, v, trans_b=True), p, spec.activation, mask, delta)
        return dk + _dot((ds * spec.scale).T.astype(q.dtype), q), dv

    # Query blocks that straddle the diagonal (or this key block's padding, or a
    # first key inside it) need the mask; those wholly after it do not. Without the
    # causal mask every query block sees this key block.
    # (`j * 0`, not 0: Triton's loop lowering wants traced bounds here.)
    if bounded:
        a, b, stop, start = (_pick(block_ranges, c) for c in range(4))
        ranges = [(start, a, True), (a, b, False), (b, stop, True)]
    else:
        first, first_full = (
            ((j * bk) // bq, pl.cdiv((j + 1) * bk, bq)) if spec.causal else (j * 0,) * 2
        )
        first_full = jnp.where((j + 1) * bk > spec.seq_len, n_q_blocks, first_full)
        ranges = [(first, first_full, True), (first_full, n_q_blocks, False)]
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for group in range(spec.kv_groups):
        carry = _over_ranges(ranges, functools.partial(_in_group, body, group), carry)
    dk, dv = carry
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _in_group(body, group, i, carry, masked):
    return body(i, carry, masked, group)


def _pick(vector, index: int):
    """Entry `index` of a small int vector, as a scalar."""
    positions = jax.lax.broadcasted_iota(jnp.int32, vector.shape, 0)
    return jnp.sum(jnp.where(positions == index, vector, 0))


def _rows(block, dim=None, groups=1):
    """The program's own block of rows of an (N, S, dim) or (N, S) array; with
    `groups`, of the KV row that grid row `b` reads."""
    if dim is None:
        return pl.BlockSpec((None, block), lambda b, i: (b // groups, i))
    return pl.BlockSpec((None, block, dim), lambda b, i: (b, i, 0))


def _whole(padded, dim=None, groups=1):
    """The whole sequence of an (N, S, dim) or (N, S) array (with `groups`, of the KV
    row grid row `b` reads)."""
    if dim is None:
        return pl.BlockSpec((None, padded), lambda b, i: (b // groups, 0))
    return pl.BlockSpec((None, padded, dim), lambda b, i: (b // groups, 0, 0))


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


def forward(q, k, v, *first_key, bias=None, launch: Launch):
    """`(out,)`, and for softmax `(out, lse)`: each row's log2-sum-exp2 too. q has G =
    `spec.kv_groups` rows per row of k and v; `first_key` `(N_kv, S')` when bounded;
    `bias` `(N, S')` float32, each query's sigmoid bias, when `spec.array_bias`."""
    (n, padded, dqk), dv = q.shape, v.shape[-1]
    bq, groups = launch.forward.block_q, launch.spec.kv_groups
    in_specs = [_rows(bq, dqk), _whole(padded, dqk, groups), _whole(padded, dv, groups)]
    in_specs += [_rows(bq, groups=groups)] * len(first_key)
    biases = () if bias is None else (bias,)
    in_specs += [_rows(bq)] * len(biases)
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
    )(q, k, v, *first_key, *biases)
    return tuple(outs)


def backward(q, k, v, *outs_and_d_out, first_key=(), bias=None, launch: Launch):
    """`(dq, dk, dv)` from the inputs, what `forward` returned, and the output's
    cotangent (and `first_key`, a tuple, and `bias` as `forward` took them); with
    `bias`, also its gradient `(N, S')`."""
    *outs, d_out = outs_and_d_out
    (_, padded, dqk), dv = q.shape, v.shape[-1]
    spec, groups = launch.spec, launch.spec.kv_groups
    bq, bk = launch.backward.block_q, launch.backward.block_k
    stats, stat_rows, stat_whole = [], [], []
    if spec.activation == "softmax":
        out, lse = outs
        delta = maths.row_delta(out, d_out)
        stats, stat_rows, stat_whole = [lse, delta], [_rows(bq)] * 2, [_whole(groups * padded)] * 2
    biases = () if bias is None else (bias,)
    dq_outs = _call(
        _dq_kernel,
        "triton_attention_dq",
        launch.backward,
        launch,
        padded // bq,
        [_rows(bq, dqk), _whole(padded, dqk, groups), _whole(padded, dv, groups), _rows(bq, dv)]
        + [_rows(bq, groups=groups)] * len(first_key)
        + [_rows(bq)] * len(biases)
        + stat_rows,
        [_rows(bq, dqk)] + [_rows(bq)] * len(biases),
        [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        + [jax.ShapeDtypeStruct(b.shape, jnp.float32) for b in biases],
    )(q, k, v, d_out, *first_key, *biases, *stats)
    dq = dq_outs[0]
    # The dk/dv kernel reads each KV row's G query rows as one row of G S'.
    kv_rows = k.shape[0]
    q_, d_out_ = (x.reshape(kv_rows, groups * padded, x.shape[-1]) for x in (q, d_out))
    stats = [s.reshape(kv_rows, groups * padded) for s in stats]
    biases = [b.reshape(kv_rows, groups * padded) for b in biases]
    bounds, bound_specs = [], []
    if first_key:
        ranges = key_block_ranges(first_key[0], spec.seq_len, bq, bk, spec.causal)
        bounds = [first_key[0], ranges]
        bound_specs = [_whole(padded), pl.BlockSpec((None, None, 4), lambda b, j: (b, j, 0))]
    dk, dv_ = _call(
        functools.partial(_dkv_kernel, n_q_blocks=padded // bq),
        "triton_attention_dkv",
        launch.backward,
        launch,
        padded // bk,
        [_whole(groups * padded, dqk), _rows(bk, dqk), _rows(bk, dv), _whole(groups * padded, dv)]
        + bound_specs
        + [_whole(groups * padded)] * len(biases)
        + stat_whole,
        [_rows(bk, dqk), _rows(bk, dv)],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q_, k, v, d_out_, *bounds, *biases, *stats)
    return (dq, dk, dv_, *dq_outs[1:])
