"""The dQ kernel of the Mosaic GPU backward's unfused pair (Hopper), for causal
softmax, sigmoid and 'none' attention; `backward.py` has the dK/dV kernel.

`mosaic_dq` is laid out like the forward kernel: two compute warpgroups own 64 query
rows (and their dO) each and walk 128-key tiles up to the diagonal, streamed by a third
warpgroup: P = w(Q K^T), dP = dO V^T, dQ += dS K (softmax: its rows' statistics read
once). With `prepared` (the raw queries and their RoPE angles) it returns the gradient
w.r.t. the queries before swish and RoPE, applying RoPE's transpose and swish' to its
rows as it writes them (`prepared.py`). With segments or sliding windows a pair of
query blocks starts at the key tile of its first key (`_pair_ranges`, found in XLA;
for a sliding window alone, `window`, computed in the kernel).
With `ctas` it runs the forward kernel's persistent schedule (measured slower, so off
by default). As in the forward kernel, the GPU reads transposed operands through
transposed shared-memory views; Mosaic GPU interpret mode cannot, so there they come
transposed from memory.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ... import maths
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
    read_block_info,
    row_stats,
    scratch_flags,
    split_extras,
)
from .common import (
    block_grid,
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


def _pair_ranges(first_key):
    """For each row of `first_key` and pair of query blocks (`2 * ROWS` rows): the key
    tile (of `2 * ROWS`) of its first key, and the tile after that of its last (the dQ
    kernel skips tiles before the first and masks those up to the second), as
    `block_info` lays them out."""
    n, seq = first_key.shape
    pairs = first_key.reshape(n, seq // (2 * ROWS), 2 * ROWS)
    return block_info(pairs[..., 0] // (2 * ROWS), -(-pairs[..., -1] // (2 * ROWS)))


def _dq_kernel(
    *refs,
    activation,
    bias,
    scale,
    n_pairs,
    full,
    interpret,
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
    n_in = (6 if interpret else 4) + 2 * keyed + softmax + 2 * to_raw
    (q_ref, k_ref, v_ref, do_ref, *rest), (dq_ref,) = refs[:n_in], refs[n_in:-1]
    first_key_ref, blocks = (rest.pop(0), rest.pop(0)) if keyed else (None, None)
    stats_ref = rest.pop(0) if softmax else None  # (N, 2, S): lse and delta per query
    raw_ref, table_ref = (rest.pop(0), rest.pop(0)) if to_raw else (None, None)
    transposed = rest
    # v_tiles: value tiles (128, D) on a GPU, transposed (D, 128) when interpreting.
    q_smem, do_smem, k_smem, v_tiles, q_bar, do_bar, k_bar, v_bar, free, *extra = refs[-1]
    if keyed:
        bounded_smem, info_bar, fk_bar, *extra = extra
        fk_at, info_at = bounded_views(bounded_smem, 2)
    if softmax:
        stat_smem, stat_bar, *extra = extra
    if to_raw and interpret:
        raw_smem, table_smem, raw_bars, *extra = extra
    kt_smem, kt_bar, *p_smem = extra if interpret else (None, None)
    rows, bk, stages = ROWS, 2 * ROWS, STAGES

    # Key tiles of 128 up to this pair's diagonal (all of them when `full`); bounded,
    # from the tile of the pair's first key (first keys do not decrease), masked up to
    # the tile of its last. Counted from tile `lo`: loop index t is tile `lo + t`. (Each
    # warpgroup reads its own copy of the range: one copy waited for by all three
    # deadlocks Mosaic GPU interpret mode under jit here.)
    def tile_range(kv, pair):
        """`(lo, mask_until, steps)`, as in the forward kernel."""
        lo, mask_until = 0, 0
        if window is not None:
            lo, mask_until = window_tiles(pair * bk, bk, window, bk)
        elif keyed:
            own = (info_at(wg), info_bar.at[wg])
            lo, mask_until = read_block_info(blocks.at[kv, pair], *own)
        return lo, mask_until, n_pairs if full else pair + 1 - lo

    def compute_item(n, kv, pair, base=None):
        """A compute warpgroup's share of one pair of query blocks; how many key tiles
        it walked. `base` (persistent): how many tiles the ring held before this
        pair's (slots continue from there)."""

        slot_of = functools.partial(ring_slot, stages=stages, base=base)

        row0 = (2 * pair + wg) * rows
        own_q, own_do = q_smem.at[wg], do_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[n, pl.ds(row0, rows)], own_q, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[n, pl.ds(row0, rows)], own_do, do_bar.at[wg])
        if keyed:  # my rows' first keys, loaded with my queries
            own_first = fk_at(wg)
            plgpu.copy_gmem_to_smem(
                first_key_ref.at[kv, pl.ds(row0, rows)], own_first, fk_bar.at[wg]
            )
        if softmax:  # my rows' lse and delta
            own_stats = stats_ref.at[n, :, pl.ds(row0, rows)]
            plgpu.copy_gmem_to_smem(own_stats, stat_smem.at[wg], stat_bar.at[wg])
        lo, mask_until, steps = tile_range(kv, pair)  # read while those load
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(do_bar.at[wg])
        first = None
        if keyed:  # my rows' first keys, across the rows of P
            plgpu.barrier_wait(fk_bar.at[wg])
            firsts = key_vector(own_first, 1, interpret)
            first = jax.lax.broadcast_in_dim(firsts, (rows, bk), [0])
        lse = delta = None
        if softmax:  # my rows' lse and delta, across the rows of P
            plgpu.barrier_wait(stat_bar.at[wg])
            lse, delta = (
                jax.lax.broadcast_in_dim(
                    key_vector(stat_smem.at[wg, which], 1, interpret), (rows, bk), [0]
                )
                for which in range(2)
            )

        def operand(x):
            return staged(x, p_smem[0] if p_smem else None, wg)

        def step(t, dq_acc, masked):
            slot = slot_of(t)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            if interpret:
                plgpu.barrier_wait(kt_bar.at[slot])
                keys_t, values_t = kt_smem.at[slot], v_tiles.at[slot]
            else:
                keys_t = k_smem.at[slot].transpose((1, 0))
                values_t = v_tiles.at[slot].transpose((1, 0))
            scores = matmul(own_q, keys_t, (rows, bk))
            p = maths.weights(scores, activation, scale, bias, lse)
            dp = matmul(own_do, values_t, (rows, bk))
            if masked:
                queries = iota((rows, bk), 0, interpret) + row0
                keys = iota((rows, bk), 1, interpret) + (lo + t) * bk
                # (a window's first keys: computed here, not held across the walk)
                firsts = first if window is None else maths.window_first_key(queries, window)
                allowed = maths.visible(queries, keys, firsts)
                p = jnp.where(allowed, p, 0.0)
            ds = maths.score_grad(dp, p, activation, allowed if masked else None, delta)
            plgpu.wgmma(dq_acc, operand(ds.astype(k_smem.dtype)), k_smem.at[slot])
            plgpu.wgmma_wait(0)
            plgpu.barrier_arrive(free.at[slot])

        def accumulate(dq_acc):
            loops = (
                ((0, steps, False),) if full else ((0, steps - 1, False), (steps - 1, steps, True))
            )
            if bounded:
                head = jnp.clip(mask_until - lo, 0, steps - 1)
                loops = ((0, head, True), (head, steps - 1, False), (steps - 1, steps, True))
            for start, stop, masked in loops:
                body = functools.partial(step, dq_acc=dq_acc, masked=masked)
                jax.lax.fori_loop(start, stop, lambda t, c, body=body: body(t) or c, None)
            return dq_acc[...]

        dq = pl.run_scoped(accumulate, plgpu.ACC((rows, q_smem.shape[-1]), jnp.float32))
        dq = dq * scale  # dS came without it
        if to_raw:  # through RoPE and swish: the raw queries' gradient
            own_rows = pl.ds(row0, rows)
            smem = raw_grads.own_smem((raw_smem, table_smem, raw_bars), wg) if interpret else None
            srcs = raw_ref.at[n, own_rows], table_ref.at[n // every, own_rows]
            dq = raw_grads.loaded_gradient(dq, *srcs, swish, interpret, smem)
        # Persistent: the next block waits for the copy to have read the buffer.
        write_back((dq, own_q, dq_ref.at[n, pl.ds(row0, rows)]), wait=base is None)
        return steps

    def tile_loader(kv, lo):
        def load(t, slot):
            tile = pl.ds((lo + t) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[kv, tile], k_smem.at[slot], k_bar.at[slot])
            if interpret:
                kt_ref, vt_ref = transposed
                plgpu.copy_gmem_to_smem(kt_ref.at[kv, :, tile], kt_smem.at[slot], kt_bar.at[slot])
                plgpu.copy_gmem_to_smem(vt_ref.at[kv, :, tile], v_tiles.at[slot], v_bar.at[slot])
            else:
                plgpu.copy_gmem_to_smem(v_ref.at[kv, tile], v_tiles.at[slot], v_bar.at[slot])

        return load

    if n_ctas is None:  # one CUDA block per pair of query blocks
        n = jax.lax.axis_index("n")
        kv = n // groups  # grouped-query heads: G query rows read one K/V row in place
        pair = n_pairs - 1 - jax.lax.axis_index("q")  # the longest rows start first
        wg = jax.lax.axis_index("wg")

        @pl.when(wg < 2)
        def _compute():
            claim_registers()
            compute_item(n, kv, pair)

        @pl.when(wg == 2)
        def _stream():
            lo, _, steps = tile_range(kv, pair)
            stream_tiles(tile_loader(kv, lo), steps, stages, (free,), n_pairs)

        return

    # Persistent: as in the forward kernel (`forward.py`), `n_ctas` CUDA blocks take the
    # pairs in turn, the ring of key/value slots running on from one into the next.
    wg = jax.lax.axis_index("wg")
    row_block, count = persistent_items(q_ref.shape[0], n_pairs, n_ctas)

    def item(j):
        n, index = row_block(j)
        return n, n // groups, n_pairs - 1 - index  # the longest rows first

    def item_tiles(j):
        n, kv, pair = item(j)
        lo, _, steps = tile_range(kv, pair)
        return tile_loader(kv, lo), steps

    run_item = lambda j, base: compute_item(*item(j), base)
    run_persistent(count, run_item, item_tiles, stages, (free,))


def mosaic_dq(
    q,
    k,
    v,
    d_out,
    activation,
    bias,
    interpret,
    full=False,
    first_key=None,
    groups=1,
    lse=None,
    delta=None,
    prepared=None,
    ctas=None,
    window=None,
):
    """dQ for `q`, `k`, `v`, `d_out`: `(N, S, D)`, S a multiple of 128 (`full`: every
    query sees every key; `first_key`, `groups`, softmax's `lse` and `delta` and
    `prepared` as `mosaic_dkv` takes them; `ctas` and `window`, as
    `forward.mosaic_forward` takes them). Under `jax.vmap` the mapped axis joins N."""
    options = kernel_options(
        activation, bias, interpret, full, groups, first_key, prepared, ctas, window
    )
    run = functools.partial(_dq, **options)
    stats = row_stats(activation, lse, delta)
    raw = () if prepared is None else prepared.arrays(q.dtype)[::2]  # queries and table
    return fold_vmap(run, q, k, v, d_out, *optional(first_key), *stats, *raw)


def _dq_scratch(q, k, v, d_out, *, keyed, softmax, raw, interpret):
    """The dQ kernel's shared memory, for arrays (or shapes) like its inputs."""
    dim = q.shape[-1]
    value_tile = (STAGES, dim, 2 * ROWS) if interpret else (STAGES, 2 * ROWS, dim)

    scratch = [
        tiled_smem((2, ROWS, dim), q.dtype),
        tiled_smem((2, ROWS, dim), d_out.dtype),
        tiled_smem((STAGES, 2 * ROWS, dim), k.dtype),
        tiled_smem(value_tile, v.dtype),
        plgpu.Barrier(num_barriers=2),  # own queries
        plgpu.Barrier(num_barriers=2),  # own dO
        plgpu.Barrier(num_barriers=STAGES),  # key tiles
        plgpu.Barrier(num_barriers=STAGES),  # value tiles
        plgpu.Barrier(num_arrivals=2, num_barriers=STAGES),  # slot released
    ]
    if keyed:  # each compute warpgroup's rows' first keys; each warpgroup's tile range
        scratch += [*bounded_scratch(2), plgpu.Barrier(num_barriers=2)]  # (first keys')
    if softmax:  # each compute warpgroup's rows' lse and delta
        scratch += [plgpu.SMEM((2, 2, ROWS), jnp.float32), plgpu.Barrier(num_barriers=2)]
    if raw:  # (interpret mode) the raw rows and their angles
        scratch += raw_grads.loaded_scratch(ROWS, dim, q.dtype, interpret)
    if interpret:  # transposed keys and the wgmma operand staged in shared memory
        scratch += [
            tiled_smem((STAGES, dim, 2 * ROWS), k.dtype),
            plgpu.Barrier(num_barriers=STAGES),
            tiled_smem((2, ROWS, 2 * ROWS), q.dtype),
        ]
    return scratch


def _dq(q, k, v, d_out, *rest, **options):
    first_key, stats, raw = split_extras(rest, options["activation"], options["n_first"])
    interpret = options["interpret"]
    n, seq, _ = q.shape
    n_pairs = seq // (2 * ROWS)
    kernel = bound_kernel(_dq_kernel, q, first_key, raw, options, n_pairs=n_pairs)
    scratch = _dq_scratch(q, k, v, d_out, **scratch_flags(first_key, stats, raw, interpret))
    inputs = [q, k, v, d_out]
    if first_key:
        inputs += [first_key[0], _pair_ranges(first_key[0])]
    inputs += [*stats, *raw]
    if interpret:
        inputs += [jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)]
    out_type = jax.ShapeDtypeStruct(q.shape, q.dtype)
    grid, names = block_grid(n_pairs, "q", n, options["ctas"])
    return launch(kernel, scratch, out_type, grid, names, interpret, *inputs)
