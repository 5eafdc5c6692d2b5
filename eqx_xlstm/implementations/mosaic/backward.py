"""Backward of causal softmax, sigmoid and 'none' attention in Pallas on Mosaic GPU
(Hopper).

`mosaic_dkv`: one CUDA block owns 128 keys: two compute warpgroups hold 64 keys (and
their values) each, and a third warpgroup streams 64-row tiles of queries and output
gradients dO through `STAGES` shared-memory slots with TMA. Per tile a compute
warpgroup forms the transposed weights P^T = w(K Q^T), accumulates dV += P^T dO, forms
dP^T = V dO^T and dS^T, and accumulates dK += dS^T Q, all on the tensor cores (wgmma).
Softmax reads each query's row statistics (the forward's log2-sum-exp2 and
delta = sum(dO * O)), streamed beside its tile: P^T = exp2(K Q^T c - lse),
dS^T = P^T (dP^T - delta).

With `fused=True` (sigmoid and 'none') the same kernel also computes dQ, so the weights
and dP are formed once rather than again by a dQ kernel: five S x S matmuls instead of
seven. Both warpgroups put their dS^T of a query tile in shared memory; once the next
tile's is written (so neither waits for the other), each forms its part of the tile's dQ
share, dS K over the block's 128 keys for one half of the head dim (for D=64, all of it
over its own 64 keys), stages it in float32 shared memory and adds it into a float32 dQ
in global memory with a TMA reduce-add. Since the kernels launch each head's blocks side
by side (`common.block_grid`), those adds land in L2. The fused kernel issues a tile's
S^T and dP^T together and waits for the previous tile's dQ part together with dV and dK:
two waits a tile instead of four. The unfused dK/dV kernel measured slower with that
grouping, so it waits for each matmul. Which of the two `attention` runs is the `Mosaic`
implementation's `fused_backward_from` (docs/benchmarks.md has the rounds).

`dq_kernel.py` has the dQ kernel of the unfused pair (`mosaic_dq`), and `backward_common.py`
what the two share.

With `prepared` (the raw queries and keys and their RoPE angles) the kernels return
the gradients w.r.t. the rows before swish and RoPE: each block applies RoPE's
transpose and swish' to its own rows as it writes them (`prepared.py`).

With segments or sliding windows both take each query's first visible key: a dK/dV
block stops after the last query tile that sees one of its keys, and a dQ pair starts
at the key tile of its first key (tile ranges found in XLA).

With `ctas` the dQ kernel and the unfused dK/dV kernel run the forward kernel's
persistent schedule (`forward.py`; measured slower, so off by default).

As in the forward kernel, the GPU reads transposed operands through transposed
shared-memory views; Mosaic GPU interpret mode cannot, so there they come transposed
from memory.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ... import maths
from .. import raw_rows
from . import jax_private
from . import prepared as raw_grads
from .backward_common import (
    ROWS,
    STAGES,
    block_info,
    bound_kernel,
    bounded_scratch,
    bounded_views,
    kernel_options,
    matmul,
    matmuls,
    read_block_info,
    row_stats,
    scratch_flags,
    split_extras,
)
from .common import (
    block_grid,
    claim_registers,
    fold_vmap,
    in_gmem,
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
    window_query_tiles,
    write_back,
)


def _dq_part_width(dim):
    """The width of each warpgroup's share of a tile's dQ in the fused kernel: half the
    head dim over all 128 keys, or, where half would be narrower than a shared-memory
    tile (D=64), all of it over the warpgroup's own 64 keys."""
    return dim if dim < 128 else dim // 2


def _kernel(
    *refs,
    activation,
    bias,
    scale,
    n_tiles,
    full,
    interpret,
    fused,
    keyed,
    window,
    groups,
    to_raw,
    swish,
    every,
    n_ctas=None,
):
    softmax = activation == "softmax"
    # Bounded: first keys read from `first_key` (`keyed`), or computed from the
    # positions for a sliding window alone (`window`).
    bounded = keyed or window is not None
    n_in = (6 if interpret else 4) + 2 * keyed + softmax + 2 * to_raw + fused
    (q_ref, k_ref, v_ref, do_ref, *rest), (dk_ref, dv_ref) = refs[:n_in], refs[n_in:-1]
    dq_ref = rest.pop() if fused else None
    first_key_ref, key_ranges = (rest.pop(0), rest.pop(0)) if keyed else (None, None)
    stats_ref = rest.pop(0) if softmax else None  # (N, 2, S): lse and delta per query
    raw_ref, table_ref = (rest.pop(0), rest.pop(0)) if to_raw else (None, None)
    transposed = rest
    k_smem, v_smem, q_smem, do_smem, k_bar, v_bar, tile_bar, free, *extra = refs[-1]
    if to_raw and (interpret or not fused):  # `raw_grads.loaded_scratch` or `early_scratch`
        *extra, raw_smem, table_smem, raw_bars = extra
    if softmax:
        *extra, stat_smem = extra
    if keyed:
        *extra, bounded_smem, info_bar = extra
        fk_at, info_at = bounded_views(bounded_smem, STAGES)
    if fused:
        *extra, ds_smem, dq_smem, ds_full, ds_free, dq_bar = extra
    qt_smem, dot_smem, *p_smem = extra if interpret else (None,) * 2
    rows, stages = ROWS, STAGES
    # A block's first query tile (`first`): warpgroup 0's diagonal, or tile 0 when
    # every query sees every key (`full`). Bounded, it stops after the last tile with
    # a query whose first key is in the block, and tiles from `mask_from` on hold
    # queries that see only some of its keys (`_key_ranges`).

    def tile_range(kv, block, first):
        """`(steps, mask_from)`: how many query tiles this block walks from `first`,
        and the first tile to mask after the diagonal."""
        if window is not None:
            key0, seq = block * 2 * rows, n_tiles * rows
            stop, mask_from = window_query_tiles(key0, 2 * rows, window, rows, seq)
            return stop - first, mask_from
        if not keyed:
            return n_tiles - first, n_tiles
        own = (info_at(wg), info_bar.at[wg])
        stop, mask_from = read_block_info(key_ranges.at[kv, block], *own)
        return stop - first, mask_from

    def compute_item(n, kv, block, first, base=None):
        """A compute warpgroup's share of one block of keys; how many query tiles it
        walked. `base` (persistent): how many tiles the ring held before this block's
        (slots continue from there)."""

        slot_of = functools.partial(ring_slot, stages=stages, base=base)

        key0 = (2 * block + wg) * rows
        own_k, own_v = k_smem.at[wg], v_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[kv, pl.ds(key0, rows)], own_k, k_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[kv, pl.ds(key0, rows)], own_v, v_bar.at[wg])
        raw_srcs = None
        if to_raw:  # my raw keys and their angles, for the end
            own_rows = pl.ds(key0, rows)
            raw_srcs = raw_ref.at[kv, own_rows], table_ref.at[n // every, own_rows]
        raw_smem_here = None
        if to_raw and (interpret or not fused):
            raw_smem_here = raw_grads.own_smem((raw_smem, table_smem, raw_bars), wg)
        if to_raw and not fused:  # (the fused kernel has no room for them)
            raw_grads.copy_early(*raw_srcs, raw_smem_here)
        block_steps, mask_from = tile_range(kv, block, first)  # read while K and V load
        plgpu.barrier_wait(k_bar.at[wg])
        plgpu.barrier_wait(v_bar.at[wg])

        def wait_tiles(slot):
            plgpu.barrier_wait(tile_bar.at[slot])

        def view(tiles, tiles_t, slot):
            """A tile's transpose: a view on the GPU, loaded transposed when interpreting."""
            return tiles_t.at[slot] if interpret else tiles.at[slot].transpose((1, 0))

        def operand(x, which):
            return staged(x, p_smem[0] if p_smem else None, (wg, which))

        def step(t, dk_acc, dv_acc, masked):
            slot = slot_of(t)
            wait_tiles(slot)
            q_t, do_t = view(q_smem, qt_smem, slot), view(do_smem, dot_smem, slot)
            if fused:  # S^T and dP^T issued together, waited for once (see above)
                scores_t, dp_t = matmuls((own_k, q_t), (own_v, do_t), shape=(rows, rows))
            else:
                scores_t = matmul(own_k, q_t, (rows, rows))
            lse_t, delta_t = column_stats(slot)
            p_t = maths.weights(scores_t, activation, scale, bias, lse_t)
            if masked:
                keys = iota((rows, rows), 0, interpret) + key0
                queries = iota((rows, rows), 1, interpret) + (first + t) * rows
                allowed = maths.visible(queries, keys, column_first_keys(slot, queries))
                p_t = jnp.where(allowed, p_t, 0.0)
            plgpu.wgmma(dv_acc, operand(p_t.astype(k_smem.dtype), 0), do_smem.at[slot])
            if not fused:
                dp_t = matmul(own_v, do_t, (rows, rows))
            # Gradient w.r.t. the logits; dK and dQ are scaled once at the end.
            ds_t = maths.score_grad(dp_t, p_t, activation, allowed if masked else None, delta_t)
            ds_t = ds_t.astype(k_smem.dtype)
            plgpu.wgmma(dk_acc, operand(ds_t, 1), q_smem.at[slot])
            if fused:  # the previous tile's dQ (the other warpgroup's dS^T of it is
                share_ds(ds_t, t)  # surely written by now), waited for with dV and dK
                pl.when(t >= 1)(lambda: store_dq(dq_part(t - 1), t - 1))
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(free.at[slot])

        def column_first_keys(slot, queries):
            """The first keys of the queries of tile `slot` (`queries`: their
            positions across the columns of P^T), across those columns; computed for a
            window alone, None unbounded."""
            if window is not None:
                return maths.window_first_key(queries, window)
            if not keyed:
                return None
            firsts = key_vector(fk_at(slot), 0, interpret)
            return jax.lax.broadcast_in_dim(firsts, (rows, rows), [1])

        def column_stats(slot):
            """Softmax: the log2-sum-exp2 and delta of the queries of tile `slot`,
            across the columns of P^T (None otherwise)."""
            if not softmax:
                return None, None
            return tuple(
                jax.lax.broadcast_in_dim(
                    key_vector(stat_smem.at[slot, which], 0, interpret), (rows, rows), [1]
                )
                for which in range(2)
            )

        def share_ds(ds_t, t):
            """Put my dS^T of tile t in shared memory for both warpgroups' dQ parts."""
            parity = jax.lax.rem(t, 2)
            # Both warpgroups must be done reading this buffer for tile t - 2.
            pl.when(t >= 2)(lambda: plgpu.barrier_wait(ds_free.at[parity]))
            ds_smem.at[parity, wg][...] = ds_t.T if interpret else ds_t  # interpret: no views
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_full.at[parity])

        def dq_part(t):
            """My part of tile t's dQ share (`_dq_part_width`), once both warpgroups'
            dS^T of it are in shared memory."""
            parity = jax.lax.rem(t, 2)
            plgpu.barrier_wait(ds_full.at[parity])

            def run(acc):
                for half in (wg,) if split_keys else range(2):
                    ds = ds_smem.at[parity, half]
                    keys = k_smem.at[half] if split_keys else k_smem.at[half, :, my_cols]
                    plgpu.wgmma(acc, ds if interpret else ds.transpose((1, 0)), keys)
                return acc[...]

            part = pl.run_scoped(run, plgpu.ACC(dq_shape, jnp.float32))
            plgpu.barrier_arrive(ds_free.at[parity])
            return part

        def store_dq(part, t):
            """Add my dQ part of tile t into the float32 sum in memory: by a TMA
            reduce-add on a GPU; by read, add, write in interpret mode, where blocks
            run in turn."""
            # Interpreted, warpgroups that add to the same columns keep a sum each.
            copy = wg if interpret and split_keys else 0
            dst = dq_ref.at[copy, n, pl.ds((first + t) * rows, rows), my_cols]
            own_dq = dq_smem.at[wg]
            if interpret:
                plgpu.copy_gmem_to_smem(dst, own_dq, dq_bar.at[wg])
                plgpu.barrier_wait(dq_bar.at[wg])
                part = part + own_dq[...]
            else:  # my previous add has read the buffer
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            own_dq[...] = part
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(own_dq, dst, reduction_op=None if interpret else "add")
            if interpret:
                plgpu.wait_smem_to_gmem(0)

        def skip(t, carry):  # a tile wholly before this warpgroup's keys
            slot = slot_of(t)
            wait_tiles(slot)
            plgpu.barrier_arrive(free.at[slot])
            if fused:  # my dS^T of it is zero
                zeros = jnp.zeros((rows, rows), k_smem.dtype)
                share_ds(zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA), t)
            return carry

        def accumulate(dk_acc, dv_acc):
            loops = ((0, block_steps, False),)
            if not full:
                jax.lax.fori_loop(0, wg, skip, None)
                loops = ((wg, wg + 1, True), (wg + 1, block_steps, False))
            if bounded:
                tail = jnp.clip(mask_from - first, wg + 1, block_steps)
                loops = ((wg, wg + 1, True), (wg + 1, tail, False), (tail, block_steps, True))
            for start, stop, masked in loops:
                body = functools.partial(step, dk_acc=dk_acc, dv_acc=dv_acc, masked=masked)
                jax.lax.fori_loop(start, stop, lambda t, c, body=body: body(t) or c, None)
            if fused:
                last = block_steps - 1
                store_dq(dq_part(last), last)
                # Both warpgroups' last reads of each buffer (every block has >= 2 tiles).
                for parity in range(2):
                    plgpu.barrier_wait(ds_free.at[parity])
            return dk_acc[...], dv_acc[...]

        dim, dv_dim = k_smem.shape[-1], v_smem.shape[-1]
        split_keys = _dq_part_width(dim) == dim
        dq_shape = (rows, _dq_part_width(dim))
        my_cols = pl.ds(0, dim) if split_keys else pl.ds(wg * dq_shape[1], dq_shape[1])
        dk, dv = pl.run_scoped(
            accumulate,
            plgpu.ACC((rows, dim), jnp.float32),
            plgpu.ACC((rows, dv_dim), jnp.float32),
        )
        own_rows = pl.ds(key0, rows)
        dk = dk * scale  # dS came without it
        if to_raw and not fused:  # through RoPE and swish: the raw keys' gradient
            dk = raw_grads.copied_gradient(dk, swish, interpret, raw_smem_here)
        elif to_raw:  # (this query row's share of it)
            dk = raw_grads.loaded_gradient(dk, *raw_srcs, swish, interpret, raw_smem_here)
        outputs = (dk, own_k, dk_ref.at[n, own_rows]), (dv, own_v, dv_ref.at[n, own_rows])
        write_back(*outputs, wait=base is None)  # persistent: the next block waits
        return block_steps

    def tile_loader(n, kv, first):
        def load(t, slot):
            tile = pl.ds((first + t) * rows, rows)
            copies = [(q_ref.at[n, tile], q_smem.at[slot]), (do_ref.at[n, tile], do_smem.at[slot])]
            if keyed:
                copies.append((first_key_ref.at[kv, tile], fk_at(slot)))
            if softmax:
                copies.append((stats_ref.at[n, :, tile], stat_smem.at[slot]))
            if interpret:
                qt_ref, dot_ref = transposed
                copies.append((qt_ref.at[n, :, tile], qt_smem.at[slot]))
                copies.append((dot_ref.at[n, :, tile], dot_smem.at[slot]))
            for src, dst in copies:  # all on the slot's one barrier
                plgpu.copy_gmem_to_smem(src, dst, tile_bar.at[slot])

        return load

    if n_ctas is None:  # one CUDA block per block of keys
        n = jax.lax.axis_index("n")
        kv = n // groups  # grouped-query heads: G query rows read one K/V row in place
        block = jax.lax.axis_index("k")
        wg = jax.lax.axis_index("wg")
        first = 0 if full else 2 * block

        @pl.when(wg < 2)
        def _compute():
            claim_registers()
            compute_item(n, kv, block, first)

        @pl.when(wg == 2)
        def _stream():
            # Every block walks at least its two diagonal tiles (each key sees its own
            # query), so those load while the block's range is read.
            def steps():
                return tile_range(kv, block, first)[0]

            load = tile_loader(n, kv, first)
            stream_tiles(load, steps, stages, (free,), n_tiles, sure=min(2, n_tiles))

        return

    # Persistent (the dK/dV pair, not the fused kernel): as in the forward kernel
    # (`forward.py`), `n_ctas` CUDA blocks take the blocks of keys in turn, the ring of
    # query tiles running on from one into the next.
    wg = jax.lax.axis_index("wg")
    row_block, count = persistent_items(q_ref.shape[0], n_tiles // 2, n_ctas)

    def item(j):
        n, block = row_block(j)
        return n, n // groups, block, 0 if full else 2 * block

    def item_tiles(j):
        n, kv, block, first = item(j)
        return tile_loader(n, kv, first), tile_range(kv, block, first)[0]

    run_item = lambda j, base: compute_item(*item(j), base)
    run_persistent(count, run_item, item_tiles, stages, (free,))


def mosaic_dkv(
    q,
    k,
    v,
    d_out,
    activation,
    bias,
    interpret,
    fused=False,
    full=False,
    first_key=None,
    groups=1,
    lse=None,
    delta=None,
    prepared=None,
    ctas=None,
    window=None,
):
    """dK, dV for `q`, `k`, `v`, `d_out`: `(N, S, D)`, S a multiple of 128. With
    `fused`, dQ too, `(dq, dk, dv)`: the same kernel adds each tile's dS K into a
    float32 sum across CUDA blocks, so the weights are computed once, not twice. With
    `full`, every query sees every key (a piece of context-parallel attention). With
    `first_key` (`(N, S)` int32, non-decreasing along S), query i sees keys from
    `first_key[i]` on, and a key block stops at the last query tile that sees it; with
    `window` w instead (a sliding window alone), the kernel computes those from the
    positions (`maths.window_first_key`).
    With `groups` G, k, v and `first_key` have N / G rows, row `n // G` serving query
    row n: the kernel forms each query row's share of dK and dV, and the G shares of a
    K/V row are summed after it (in float32). Softmax needs each query's `lse` (the
    forward kernel's log2-sum-exp2) and `delta` (`sum(dO * O)`), `(N, S)` float32
    each; the fused kernel takes no softmax. With `prepared` (`raw_rows.Prepared`),
    `q` and `k` are queries and keys after swish and RoPE, and the gradients returned
    are w.r.t. the raw ones, formed as each kernel writes its rows. `ctas`: a
    persistent schedule, as `forward.mosaic_forward` takes it (not with `fused`). Under
    `jax.vmap` the mapped axis joins N (the fused kernel only where `in_gmem` can hide
    its in-place sum)."""
    if fused and activation == "softmax":
        raise ValueError("the fused backward kernel takes no softmax")
    options = kernel_options(
        activation, bias, interpret, full, groups, first_key, prepared, ctas, window
    )
    if fused and ctas is not None:
        raise ValueError("the fused backward kernel has no persistent schedule (ctas)")
    run = functools.partial(_dkv, fused=fused, **options)
    raw = () if prepared is None else prepared.arrays(q.dtype)
    arrays = (q, k, v, d_out, *optional(first_key), *row_stats(activation, lse, delta), *raw)
    if fused and jax_private.ref_type_mappings() is None:
        return run(*arrays)
    return fold_vmap(run, *arrays)


def _key_ranges(first_key):
    """For each row and block of `2 * ROWS` keys, `(stop, mask_from)` in query tiles
    of `ROWS` (`maths.key_block_reach`: the tile after the last query that sees a key
    of the block, and the first tile with a query that does not see all of them), as
    `block_info` lays them out."""
    mask_from, stop = maths.key_block_reach(first_key, 2 * ROWS, ROWS)
    return block_info(stop, mask_from)


# Scratch sizes (bytes, as `common.scratch_bytes` counts them) up to which the dK/dV
# kernel ran at full speed on an H200, 64 KiB apart; 16 bytes more and it ran 15-20%
# slower where blocks walk few tiles (likely the SM's shared-memory carveout steps of
# 132 and 196 KiB, less what the runtime reserves; docs/benchmarks.md, issue #10's
# eighth part).
FAST_SCRATCH_BYTES = (133240, 133240 + 65536)


def _dkv_scratch(q, k, v, d_out, *, fused, keyed, softmax, raw, interpret):
    """The dK/dV kernel's shared memory, for arrays (or shapes) like its inputs. Kept
    within `FAST_SCRATCH_BYTES` where blocks walk few tiles (one barrier per
    slot, one buffer of small int32 entries): a step past it measured 15-20% slower
    (docs/benchmarks.md)."""
    dim = q.shape[-1]
    scratch = [
        tiled_smem((2, ROWS, dim), k.dtype),
        tiled_smem((2, ROWS, dim), v.dtype),
        tiled_smem((STAGES, ROWS, dim), q.dtype),
        tiled_smem((STAGES, ROWS, dim), d_out.dtype),
        plgpu.Barrier(num_barriers=2),  # own keys
        plgpu.Barrier(num_barriers=2),  # own values
        # A slot's tiles (queries, dO, and first keys, lse and delta, transposed tiles
        # where the kernel takes them), each copy one arrival on the slot's barrier.
        plgpu.Barrier(num_arrivals=2 + keyed + softmax + 2 * interpret, num_barriers=STAGES),
        plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # slot released
    ]
    if interpret:  # transposed tiles and the wgmma operands staged in shared memory
        scratch += [
            tiled_smem((STAGES, dim, ROWS), q.dtype),
            tiled_smem((STAGES, dim, ROWS), d_out.dtype),
            tiled_smem((2, 2, ROWS, ROWS), q.dtype),
        ]
    if fused:  # dS^T of both warpgroups for two tiles; each one's float32 dQ part
        scratch += [
            tiled_smem((2, 2, ROWS, ROWS), q.dtype),  # (tile parity, warpgroup)
            plgpu.SMEM((2, ROWS, _dq_part_width(dim)), jnp.float32),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),  # both dS^T written
            plgpu.Barrier(num_arrivals=2, num_barriers=2),  # both dQ parts formed
            plgpu.Barrier(num_barriers=2),  # dQ read back (interpret mode)
        ]
    if keyed:  # the streamed query tiles' first keys; each warpgroup's tile range
        scratch += bounded_scratch(STAGES)
    if softmax:  # the streamed query tiles' lse and delta
        scratch += [plgpu.SMEM((STAGES, 2, ROWS), jnp.float32)]
    if raw:  # the raw rows and their angles (the fused kernel's: interpret mode only)
        if fused:
            scratch += raw_grads.loaded_scratch(ROWS, dim, k.dtype, interpret)
        else:
            scratch += raw_grads.early_scratch(ROWS, dim, k.dtype)
    return scratch


def _dkv(q, k, v, d_out, *rest, fused, **options):
    first_key, stats, raw = split_extras(rest, options["activation"], options["n_first"])
    interpret, groups = options["interpret"], options["groups"]
    n, seq, dim = q.shape
    kernel = bound_kernel(_kernel, q, first_key, raw, options, n_tiles=seq // ROWS, fused=fused)
    flags = scratch_flags(first_key, stats, raw, interpret)
    scratch = _dkv_scratch(q, k, v, d_out, fused=fused, **flags)
    inputs = [q, k, v, d_out]
    if first_key:
        inputs += [first_key[0], _key_ranges(first_key[0])]
    inputs += [*stats, *raw[1:]]  # raw keys and the table (raw queries: after the kernel)
    if interpret:
        inputs += [jnp.swapaxes(q, 1, 2), jnp.swapaxes(d_out, 1, 2)]
    # One share of dK and dV per query row (`_group_sums` adds a K/V row's G shares).
    out_type = tuple(jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype) for x in (k, v))
    grid, names = block_grid(seq // (2 * ROWS), "k", n, options["ctas"])
    if not fused:
        dk, dv = launch(kernel, scratch, out_type, grid, names, interpret, *inputs)
        return _group_sums(dk, groups), _group_sums(dv, groups)

    def update(dq_sum, dk_ref, dv_ref):  # the kernel adds into dq_sum in place
        dk_ref[...], dv_ref[...] = launch(
            kernel, scratch, out_type, grid, names, interpret, *inputs, dq_sum
        )

    # Interpreted, warpgroups that add to the same columns keep a sum each.
    copies = 2 if interpret and _dq_part_width(dim) == dim else 1
    zeros = jnp.zeros((copies, *q.shape), jnp.float32)
    shares = (jnp.zeros(out.shape, out.dtype) for out in out_type)
    dq, dk, dv = in_gmem(update, zeros, *shares)
    dq = dq.sum(0) * dim**-0.5  # the kernel's dS came without the scale
    if raw:  # dQ sums over blocks: the raw queries' gradient after the kernel, in XLA
        dq = _raw_gradient_rows(dq, raw, options["swish"])
    return dq.astype(q.dtype), _group_sums(dk, groups), _group_sums(dv, groups)


def _raw_gradient_rows(grad, raw, swish):
    """`raw_rows.raw_gradient` of every row (in XLA): `raw` = (q, k, table bits)."""
    raw_q, table = raw[0], raw[-1]
    tables = table.shape[0]
    grad = grad.reshape(tables, -1, *grad.shape[1:])
    rows = raw_q.reshape(grad.shape)
    out = raw_rows.raw_gradient(grad, rows, raw_rows.from_bits(table[:, None]), swish)
    return out.reshape(raw_q.shape)


def _group_sums(shares, groups):
    """The sums of each `groups` consecutive rows of `shares` (float32, then its dtype)."""
    if groups == 1:
        return shares
    summed = shares.reshape(-1, groups, *shares.shape[1:]).sum(1, dtype=jnp.float32)
    return summed.astype(shares.dtype)
