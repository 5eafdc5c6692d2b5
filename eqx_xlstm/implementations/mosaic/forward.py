"""Causal attention forward kernel in Pallas on Mosaic GPU (Hopper): sigmoid, 'none'
and softmax.

One CUDA block handles two query blocks of `BLOCK_Q` rows with three warpgroups: two
compute warpgroups (one query block each) and one that only streams key/value tiles
into a ring of `STAGES` shared-memory slots with TMA. A compute warpgroup waits for a
slot, multiplies its queries by the key tile on the tensor cores (wgmma), applies the
weights in registers, multiplies by the value tile, and marks the slot consumed; the
streaming warpgroup refills a slot once both compute warpgroups are done with it.
Sigmoid needs no running max or row sum, so nothing is rescaled between tiles. Softmax
keeps both per row (exp2 of raw scores times scale * log2(e)) and rescales the output
once a tile's maxima are known.

With segments or sliding windows the kernel takes each query's first visible key: a
block starts at the key tile of its rows' first key (first keys do not decrease) and
masks up to the tile of their last, besides the diagonal. For a sliding window alone
it computes them from the positions instead of reading them (`window`), so that a
block's first key tiles need not wait for a read of its first keys.

The two compute warpgroups take turns issuing their matmuls ("ping-pong"), so one
computes weights while the other's matmuls run. A warpgroup passes the turn as soon as
its matmuls are issued, so that the other's queue right behind them; passing it only
once they were done measured slower (docs/benchmarks.md). Each head's blocks are
launched side by side (`common.block_grid`).

With `ctas`, the kernel runs a persistent schedule instead: that many CUDA blocks take
the blocks of query rows in turn, the ring of key/value slots (and two buffers of first
keys) running on from one block into the next, so that the streaming warpgroup loads a
block's first tiles while the previous block still computes (`attention` uses it
with `Mosaic(ctas=C)`; measured slower than the grid but for a window's forward,
`benchmarks/persistent_kernels.py`).

On a GPU, q k^T reads each key tile through a transposed view of shared memory (wgmma
takes either major order). On a machine without a GPU the same kernel runs in Mosaic
GPU interpret mode, which cannot transpose a shared-memory view; there the keys are
transposed in front, `(N, D, S)`, and tiles are loaded as `(D, BLOCK_K)`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ... import maths
from .common import (
    block_first_keys,
    block_grid,
    check_options,
    claim_registers,
    fold_vmap,
    iota,
    key_vector,
    launch,
    optional,
    persistent_items,
    ring_slot,
    run_persistent,
    staged,
    stream_tiles,
    tiled_smem,
    window_tiles,
    write_back,
)

BLOCK_Q = 64  # query rows per compute warpgroup (the wgmma M)
BLOCK_K = 2 * BLOCK_Q  # key rows per tile: both warpgroups then walk as many tiles
STAGES = 3  # key/value slots in flight


def _kernel(
    *refs,
    activation,
    bias,
    scale,
    n_blocks,
    full,
    interpret,
    groups,
    keyed,
    window=None,
    n_ctas=None,
):
    softmax = activation == "softmax"
    persistent = n_ctas is not None
    # Bounded: first keys read from `first_key` (`keyed`), or computed from the
    # positions for a sliding window alone (`window`).
    bounded = keyed or window is not None
    n_out = 1 + softmax  # softmax: the output and each row's log2-sum-exp2
    (q_ref, k_ref, v_ref, *first_keys), scratch = refs[: -1 - n_out], refs[-1]
    out_ref, *lse_ref = refs[-1 - n_out : -1]
    q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free, turn, *extra = scratch
    lse_smem = extra.pop(0) if softmax else None
    # Keyed: the block's rows' first keys, one buffer and one barrier (persistent: two
    # of each, and a barrier that says a buffer was read).
    block_keys, keys_bar = (extra.pop(0), extra.pop(0)) if keyed else (None, None)
    keys_free = extra.pop(0) if keyed and persistent else None
    p_smem = extra
    bq, bk, stages = BLOCK_Q, BLOCK_K, STAGES
    # Key tiles a block needs: up to the diagonal of its second query block (all of
    # them with the `full` mask); bounded, from the tile of its rows' first key (the
    # first keys do not decrease) and masked up to the tile of their last one.
    n_tiles = n_blocks * 2 * bq // bk

    def block_range(kv, pair, buf):
        """Every warpgroup, at a block's start: `(lo, mask_until, block_steps)`, its key
        tiles (bounded: after its rows' first keys are copied into buffer `buf`)."""
        lo, mask_until = 0, 0  # each loop index t below is tile `lo + t`
        if window is not None:
            lo, mask_until = window_tiles(pair * 2 * bq, 2 * bq, window, bk)
        elif keyed:
            rows = first_keys[0].at[kv, pl.ds(pair * 2 * bq, 2 * bq)]
            keys, bar = (
                (block_keys, keys_bar.at[0])
                if buf is None
                else (block_keys.at[buf], keys_bar.at[buf])
            )
            lo, mask_until = block_first_keys(rows, keys, bar, issuer=2)(bk)
        block_steps = n_tiles if full else pl.cdiv((pair + 1) * 2 * bq, bk) - lo
        return lo, mask_until, block_steps

    def copy_queries(n, row0):  # a compute warpgroup's, issued before the range is read
        plgpu.copy_gmem_to_smem(q_ref.at[n, pl.ds(row0, bq)], q_smem.at[wg], q_bar.at[wg])

    def compute_item(n, row0, lo, mask_until, block_steps, base=None, buf=None):
        """A compute warpgroup's share of one block (`row0`: its first query row).
        `base` (persistent): how many tiles the ring held before this block's (slots
        continue from there); `buf`: the keys buffer of this block."""
        keys = block_keys if buf is None else (block_keys.at[buf] if keyed else None)

        slot_of = functools.partial(ring_slot, stages=stages, base=base)

        own = q_smem.at[wg]
        plgpu.barrier_wait(q_bar.at[wg])
        steps = block_steps if full else pl.cdiv(row0 + bq, bk) - lo
        # Tiles [head, diagonal) are wholly visible; those before `head` and from the
        # diagonal on are masked.
        diagonal = steps if full else row0 // bk - lo
        head = jnp.clip(mask_until - lo, 0, diagonal) if bounded else 0
        loops = ((0, head, True), (head, diagonal, False), (diagonal, steps, True))
        if not bounded:
            loops = loops[1:]
        dv = v_ref.shape[-1]
        row_first = None
        if keyed:  # my rows' first keys, in the scores' row layout
            row_first = key_vector(keys.at[pl.ds(wg * bq, bq)], 1, interpret)
            if base is not None:  # read: the streamer may refill the buffer
                plgpu.barrier_arrive(keys_free.at[buf])

        def key_tile(slot):
            tile = k_smem.at[slot]
            return tile if interpret else tile.transpose((1, 0))

        def visible(t):
            rows = iota((bq, bk), 0, interpret) + row0
            cols = iota((bq, bk), 1, interpret) + (lo + t) * bk
            first = None
            if window is not None:
                first = maths.window_first_key(rows, window)
            elif keyed:
                first = jax.lax.broadcast_in_dim(row_first, (bq, bk), [0])
            return maths.visible(rows, cols, first)

        def weights(scores, t, masked):
            p = maths.weights(scores, activation, scale, bias)
            if masked:
                p = jnp.where(visible(t), p, 0.0)
            return p.astype(v_smem.dtype)

        def operand(p):
            return staged(p, p_smem[0] if p_smem else None, wg)

        def pingpong_step(t, p_prev, o_acc, masked):
            """My turn: p @ v of tile t - 1, then the scores of tile t; hand the tensor
            cores to the other warpgroup and compute the weights of tile t meanwhile."""
            slot, prev = slot_of(t), slot_of(t + stages - 1)
            plgpu.barrier_wait(turn.at[wg])

            @pl.when(t > 0)
            def _():
                plgpu.barrier_wait(v_bar.at[prev])
                plgpu.wgmma(o_acc, operand(p_prev), v_smem.at[prev])

            plgpu.barrier_wait(k_bar.at[slot])

            def qk(s_acc):
                plgpu.wgmma(s_acc, own, key_tile(slot))
                plgpu.barrier_arrive(turn.at[1 - wg])  # the other's matmuls queue behind
                return s_acc[...]  # waits for both matmuls

            scores = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            pl.when(t > 0)(lambda: plgpu.barrier_arrive(v_free.at[prev]))
            return weights(scores, t, masked)

        def accumulate_pingpong(o_acc):
            # Both warpgroups walk the same number of tiles, so the turns pair up:
            # warpgroup 0 goes first.
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))
            p = jnp.zeros((bq, bk), v_smem.dtype)
            if not interpret:
                p = plgpu.layout_cast(p, plgpu.Layout.WGMMA)
            for start, stop, masked in loops:
                body = functools.partial(pingpong_step, o_acc=o_acc, masked=masked)
                p = jax.lax.fori_loop(start, stop, body, p)
            last = slot_of(steps - 1)
            plgpu.barrier_wait(turn.at[wg])
            plgpu.barrier_wait(v_bar.at[last])
            plgpu.wgmma(o_acc, operand(p), v_smem.at[last])
            pl.when(wg == 0)(lambda: plgpu.barrier_arrive(turn.at[1]))
            out = o_acc[...]
            plgpu.barrier_arrive(v_free.at[last])
            return out

        def drain(t, carry):
            # Tiles the other warpgroup still needs: keep the slot phases in step.
            slot = slot_of(t)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

        def fill(shape, value, layout):
            x = jnp.full(shape, value, jnp.float32)
            return x if interpret else plgpu.layout_cast(x, layout)

        def accumulators(fn, *values):
            """`fn(*accumulators)` issues wgmma into accumulators that start at `values`;
            their values after it. Mosaic GPU interpret mode has no `run_state`: there
            they start at zero and `values` are added after."""
            if not interpret:
                init = tuple(plgpu.ACC.init(x) for x in values)
                return pl.run_state(lambda accs: fn(*accs))(init)

            def scoped(*accs):
                fn(*accs)
                return tuple(acc[...] for acc in accs)

            outs = pl.run_scoped(scoped, *(plgpu.ACC(x.shape, jnp.float32) for x in values))
            return tuple(x + out for x, out in zip(values, outs, strict=True))

        def softmax_step(t, carry, masked):
            """`pingpong_step` for softmax. The output is a value here, not an
            accumulator held across tiles: once tile t - 1's p @ v is in, it is rescaled
            by exp2(old row max - new row max) with tile t's maxima."""
            p_prev, o, row_max, row_sum = carry
            slot, prev = slot_of(t), slot_of(t + stages - 1)
            plgpu.barrier_wait(turn.at[wg])

            def matmuls(o_acc, s_acc):
                @pl.when(t > 0)
                def _():
                    plgpu.barrier_wait(v_bar.at[prev])
                    plgpu.wgmma(o_acc, operand(p_prev), v_smem.at[prev])

                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.wgmma(s_acc, own, key_tile(slot))
                plgpu.barrier_arrive(turn.at[1 - wg])

            o, scores = accumulators(matmuls, o, fill((bq, bk), 0.0, plgpu.Layout.WGMMA))
            plgpu.barrier_arrive(k_free.at[slot])
            pl.when(t > 0)(lambda: plgpu.barrier_arrive(v_free.at[prev]))
            # Maxima of the raw scores (scale > 0), so that each weight is one fused
            # multiply-add and an exp2 (faster than scaling the scores first).
            s, c = scores, scale * maths.LOG2E
            if masked:
                s = jnp.where(visible(t), s, -jnp.inf)
            new_max = jnp.maximum(row_max, s.max(axis=1))
            shift = new_max
            if masked and bounded:  # a row may have seen no key yet: shift by 0, not -inf
                shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            alpha = jnp.exp2((row_max - shift) * c)
            p = jnp.exp2(s * c - jax.lax.broadcast_in_dim(shift * c, s.shape, [0]))
            row_sum = row_sum * alpha + p.sum(axis=1)
            o = o * jax.lax.broadcast_in_dim(alpha, o.shape, [0])
            return p.astype(v_smem.dtype), o, new_max, row_sum

        def accumulate_softmax():
            # Every row sees itself, so its row sum ends positive. Unbounded, every row
            # has a key in tile 0, so the running max is finite from there on; bounded,
            # a row's may stay -inf through masked tiles (`softmax_step` shifts by 0).
            pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))
            rows = plgpu.Layout.WGMMA.reduce(1)
            carry = (
                fill((bq, bk), 0.0, plgpu.Layout.WGMMA).astype(v_smem.dtype),
                fill((bq, dv), 0.0, plgpu.Layout.WGMMA),
                fill((bq,), -jnp.inf, rows),
                fill((bq,), 0.0, rows),
            )
            for start, stop, masked in loops:
                body = functools.partial(softmax_step, masked=masked)
                carry = jax.lax.fori_loop(start, stop, body, carry)
            p, o, row_max, row_sum = carry
            last = slot_of(steps - 1)
            plgpu.barrier_wait(turn.at[wg])
            plgpu.barrier_wait(v_bar.at[last])

            def last_pv(o_acc):
                plgpu.wgmma(o_acc, operand(p), v_smem.at[last])
                pl.when(wg == 0)(lambda: plgpu.barrier_arrive(turn.at[1]))

            (o,) = accumulators(last_pv, o)
            plgpu.barrier_arrive(v_free.at[last])
            # The row's log2-sum-exp2 of the logits, the backward's row statistic.
            row_stat = row_max * (scale * maths.LOG2E) + jnp.log2(row_sum)
            return o / jax.lax.broadcast_in_dim(row_sum, o.shape, [0]), row_stat

        rows = pl.ds(row0, bq)
        if softmax:
            acc, row_stat = accumulate_softmax()
            outputs = [(row_stat, lse_smem.at[wg], lse_ref[0].at[n, rows])]
        else:
            acc = pl.run_scoped(accumulate_pingpong, plgpu.ACC((bq, dv), jnp.float32))
            outputs = []
        jax.lax.fori_loop(steps, block_steps, drain, None)
        # The queries' slot takes the output (dqk == dv).
        # Persistent: the next block waits for the copies to have read the buffers.
        write_back((acc, own, out_ref.at[n, rows]), *outputs, wait=base is None)

    def tile_loader(kv, lo):
        def load(t, slot):
            cols = pl.ds((lo + t) * bk, bk)
            keys = k_ref.at[kv, :, cols] if interpret else k_ref.at[kv, cols]
            plgpu.copy_gmem_to_smem(keys, k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[kv, cols], v_smem.at[slot], v_bar.at[slot])

        return load

    if not persistent:  # one CUDA block per block of query rows
        n = jax.lax.axis_index("n")
        kv = n // groups  # grouped-query heads: G query rows read one K/V row in place
        pair = n_blocks - 1 - jax.lax.axis_index("q")  # the longest rows start first
        wg = jax.lax.axis_index("wg")
        row0 = pair * 2 * bq + wg * bq  # a compute warpgroup's first query row
        pl.when(wg < 2)(lambda: copy_queries(n, row0))
        lo, mask_until, block_steps = block_range(kv, pair, None)

        @pl.when(wg < 2)
        def _compute():
            claim_registers()
            compute_item(n, row0, lo, mask_until, block_steps)

        @pl.when(wg == 2)
        def _stream():
            stream_tiles(tile_loader(kv, lo), block_steps, stages, (k_free, v_free), n_tiles)

        return

    # Persistent: `n_ctas` CUDA blocks take the blocks of query rows in turn; the ring of
    # key/value slots runs on from one block into the next, so that the streaming
    # warpgroup loads a block's first tiles while the previous block computes.
    wg = jax.lax.axis_index("wg")
    row_block, count = persistent_items(q_ref.shape[0], n_blocks, n_ctas)

    def item(j):
        n, index = row_block(j)
        # (the longest rows first; the keys buffers take turns)
        return n, n // groups, n_blocks - 1 - index, jax.lax.rem(j, 2)

    def run_item(j, base):
        n, kv, pair, buf = item(j)
        row0 = pair * 2 * bq + wg * bq
        copy_queries(n, row0)
        lo, mask_until, block_steps = block_range(kv, pair, buf)
        compute_item(n, row0, lo, mask_until, block_steps, base, buf)
        return block_steps

    def item_tiles(j):
        n, kv, pair, buf = item(j)
        if keyed:  # the compute warpgroups have read the keys buffer's last block
            pl.when(j >= 2)(lambda: plgpu.barrier_wait(keys_free.at[buf]))
        lo, _, block_steps = block_range(kv, pair, buf)
        return tile_loader(kv, lo), block_steps

    def stream_end():  # the last reads of the keys buffers
        last = lambda j, carry: plgpu.barrier_wait(keys_free.at[jax.lax.rem(j, 2)]) or carry
        jax.lax.fori_loop(jnp.maximum(count - 2, 0), count, last, None)

    stream_end = stream_end if keyed else None
    run_persistent(count, run_item, item_tiles, stages, (k_free, v_free), stream_end)


def mosaic_forward(
    q,
    k,
    v,
    activation,
    bias,
    interpret,
    full=False,
    groups=1,
    first_key=None,
    ctas=None,
    window=None,
):
    """Causal attention output for `q`, `k`, `v`: `(N, S, D)`, S a multiple of
    `2 * BLOCK_Q` and of `BLOCK_K` (softmax: `(out, lse)`, lse each row's
    log2-sum-exp2 of the logits, `(N, S)` float32, the backward kernels' row
    statistic); with `full`, every query sees every key (a piece of context-parallel
    attention); with `groups` G, k and v have N / G rows, row
    `n // G` serving query row n; with `first_key` (`(N / G, S)` int32, non-decreasing
    along S, like k's rows), query i sees keys from `first_key[i]` on, and key tiles
    before its block's first key are skipped; with `window` w instead (a sliding window
    alone, `maths.window_first_key`), the kernel computes them from the positions rather
    than reading them. With `ctas` (a persistent schedule,
    measured slower on an H200 but for windows), that many CUDA blocks take the blocks
    of query rows in turn, the streamed tiles running on from one block into the next.
    Under `jax.vmap` the mapped axis joins N."""
    check_options(full, first_key, ctas, window)
    run = functools.partial(
        _forward,
        activation=activation,
        bias=bias,
        interpret=interpret,
        full=full,
        groups=groups,
        ctas=ctas,
        window=window,
    )
    return fold_vmap(run, q, k, v, *optional(first_key))


def _forward(q, k, v, *first_key, activation, bias, interpret, full, groups, ctas, window):
    n, seq, dqk = q.shape
    dv = v.shape[-1]
    n_blocks = seq // (2 * BLOCK_Q)
    kernel = functools.partial(
        _kernel,
        activation=activation,
        bias=bias,
        scale=dqk**-0.5,
        n_blocks=n_blocks,
        full=full,
        interpret=interpret,
        groups=groups,
        keyed=bool(first_key),
        window=window,
        n_ctas=ctas,
    )

    scratch = (
        tiled_smem((2, BLOCK_Q, dqk), q.dtype),
        tiled_smem((STAGES, *((dqk, BLOCK_K) if interpret else (BLOCK_K, dqk))), q.dtype),
        tiled_smem((STAGES, BLOCK_K, dv), v.dtype),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=STAGES),
        plgpu.Barrier(num_barriers=STAGES),
        plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
        plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),
        plgpu.Barrier(num_barriers=2),  # whose turn it is on the tensor cores
    )
    if activation == "softmax":  # each compute warpgroup's rows' log2-sum-exp2
        scratch += (plgpu.SMEM((2, BLOCK_Q), jnp.float32),)
    if first_key and ctas is None:  # the block's rows' first keys
        scratch += (plgpu.SMEM((2 * BLOCK_Q,), jnp.int32), plgpu.Barrier(num_barriers=1))
    elif first_key:  # persistent: two buffers of them, and when each was read
        scratch += (
            plgpu.SMEM((2, 2 * BLOCK_Q), jnp.int32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),
        )
    if interpret:
        scratch += (tiled_smem((2, BLOCK_Q, BLOCK_K), v.dtype),)
    out_type = jax.ShapeDtypeStruct((n, seq, dv), v.dtype)
    if activation == "softmax":
        out_type = (out_type, jax.ShapeDtypeStruct((n, seq), jnp.float32))
    keys = jnp.swapaxes(k, 1, 2) if interpret else k
    grid, names = block_grid(n_blocks, "q", n, ctas)
    return launch(kernel, scratch, out_type, grid, names, interpret, q, keys, v, *first_key)
