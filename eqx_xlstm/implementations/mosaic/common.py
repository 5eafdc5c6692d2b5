"""Pieces shared by the Mosaic GPU (Hopper) attention kernels in `forward` and
`backward`: the launch and its grid, the streaming warpgroup, the write-back, and
batching under `jax.vmap`.

Every kernel runs three warpgroups per CUDA block: two compute warpgroups and one that
streams tiles into shared memory with TMA (`launch`, `stream_tiles`). On a machine
without a GPU the same kernels run in Mosaic GPU interpret mode, which has no register
layouts and cannot transpose shared-memory views; the kernels branch on `interpret`
where that matters.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ... import maths
from . import jax_private

# Registers per thread: compute warpgroups take them from the streaming one
# (2 x 128 x 232 + 128 x 40 of the 65536 a CUDA block may hold).
COMPUTE_REGISTERS, STREAM_REGISTERS = 232, 40


def scratch_bytes(scratch):
    """The shared memory Pallas gives a kernel's `scratch` (`plgpu.SMEM` buffers and
    `plgpu.Barrier`s): each buffer rounded up to 1 KiB, 8 bytes a barrier."""
    total = 0
    for entry in scratch:
        if isinstance(entry, plgpu.Barrier):
            total += 8 * int(np.prod(entry.num_barriers))  # (an int, or a shape)
        else:
            size = int(np.prod(entry.shape)) * jnp.dtype(entry.dtype).itemsize
            total += -(-size // 1024) * 1024
    return total


def tiled_smem(shape, dtype):
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def iota(shape, axis, interpret):
    if interpret:  # the interpreter has no layouts
        return jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)


def claim_registers():
    """In a compute warpgroup: raise its register limit to `COMPUTE_REGISTERS`."""
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")


def stream_tiles(load, steps, stages, free_bars, max_prefill, sure=0):
    """The streaming warpgroup: `load(t, slot)` tiles 0 .. `steps` - 1 into a ring of
    `stages` slots. The first slots are filled at once (at most `max_prefill`, a static
    bound that keeps addresses in range); slot t % stages is refilled with tile t once
    every barrier of `free_bars` says the consumers released it. Finally the last
    releases are waited out, so that no barrier phase goes unobserved.

    `steps` may be a function that reads it (from memory): the first `sure` tiles,
    known to be needed, are loaded before it is called."""
    plgpu.set_max_registers(STREAM_REGISTERS, action="decrease")
    prefill = min(stages, max_prefill)
    for slot in range(min(sure, prefill)):
        load(slot, slot)
    if callable(steps):
        steps = steps()
    for slot in range(min(sure, prefill), prefill):
        pl.when(slot < steps)(functools.partial(load, slot, slot))

    def refill(t, carry):
        _wait_released(t, stages, free_bars)
        load(t, jax.lax.rem(t, stages))
        return carry

    jax.lax.fori_loop(stages, steps, refill, None)
    release_ring(steps, stages, free_bars)


def check_ctas(ctas):
    """A kernel's `ctas` (its persistent schedule's CUDA blocks): None or an int >= 1."""
    if ctas is not None and (not isinstance(ctas, int) or isinstance(ctas, bool) or ctas < 1):
        raise ValueError(f"`ctas` must be a positive int or None, got {ctas!r}.")


def check_options(full, first_key, ctas, window=None):
    """A kernel call's `full` (every query sees every key), `first_key`, `ctas` and
    `window`, checked alike by every kernel's entry point."""
    if full and (first_key is not None or window is not None):
        raise ValueError("full pieces take no first keys or window")
    if window is not None:
        if first_key is not None:
            raise ValueError("a kernel takes first keys or a window, not both")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"`window` must be a positive int or None, got {window!r}.")
    check_ctas(ctas)


def persistent_items(n_rows, n_blocks, n_ctas):
    """In a persistent kernel (`block_grid` with `ctas`) over `n_blocks` blocks of
    each of `n_rows` rows: `(item, count)`, this CUDA block's j-th item (j < `count`)
    being `(row, block) = item(j)` (the CUDA blocks take the items in turn, row by row,
    so those running at one time share a few rows' tiles in L2 as `block_grid`'s do)."""
    cta = jax.lax.axis_index(PERSISTENT_AXIS)
    count = jnp.maximum(n_rows * n_blocks - cta + n_ctas - 1, 0) // n_ctas

    def item(j):
        index = cta + j * n_ctas
        return index // n_blocks, index % n_blocks

    return item, count


def run_persistent(count, run_item, item_tiles, stages, free_bars, stream_end=None):
    """A persistent kernel's warpgroups over this CUDA block's `count` items: the two
    compute warpgroups run `compute_items(count, run_item)`, the streaming one
    `stream_items(count, item_tiles, ...)` and then `stream_end()` if given."""
    wg = jax.lax.axis_index("wg")

    @pl.when(wg < 2)
    def _compute():
        claim_registers()
        compute_items(count, run_item)

    @pl.when(wg == 2)
    def _stream():
        stream_items(count, item_tiles, stages, free_bars)
        if stream_end is not None:
            stream_end()


def compute_items(count, run_item):
    """A persistent kernel's compute warpgroup: `run_item(j, base)` for its items j <
    `count`, `base` counting the tiles the ring held before item j (`run_item` returns
    how many item j took). Each item starts once the previous one's output copies have
    read their buffers; the last ones are waited out at the end."""

    def body(j, base):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        return base + run_item(j, base)

    jax.lax.fori_loop(0, count, body, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def stream_items(count, item_tiles, stages, free_bars):
    """A persistent kernel's streaming warpgroup: for its items j < `count`,
    `(load, steps) = item_tiles(j)`, and `stream_ring` loads them; then `release_ring`."""
    plgpu.set_max_registers(STREAM_REGISTERS, action="decrease")

    def body(j, base):
        load, steps = item_tiles(j)
        return stream_ring(load, base, steps, stages, free_bars)

    release_ring(jax.lax.fori_loop(0, count, body, jnp.int32(0)), stages, free_bars)


def ring_slot(t, stages, base=None):
    """The ring slot of a block's tile t: t % stages, or with `base` (persistent: the
    tiles the ring held before this block's) (base + t) % stages."""
    return jax.lax.rem(t, stages) if base is None else jax.lax.rem(base + t, stages)


def stream_ring(load, base, steps, stages, free_bars):
    """A persistent kernel's streaming warpgroup, for one item: `load(t, slot)` its
    tiles 0 .. `steps` - 1, tile t into slot (base + t) % stages once every barrier of
    `free_bars` says the tile `stages` before it there was released. Returns
    base + steps, the next item's base."""

    def one(t, carry):
        g = base + t
        pl.when(g >= stages)(lambda: _wait_released(g, stages, free_bars))
        load(t, ring_slot(t, stages, base))
        return carry

    jax.lax.fori_loop(0, steps, one, None)
    return base + steps


def release_ring(tiles, stages, free_bars):
    """After a persistent kernel's last item (`tiles` streamed in all): wait out the
    last releases, so that no barrier phase goes unobserved."""

    def wait(g, carry):
        _wait_released(g, stages, free_bars)
        return carry

    jax.lax.fori_loop(jnp.maximum(tiles - stages, 0), tiles, wait, None)


def _wait_released(g, stages, free_bars):
    for bar in free_bars:
        plgpu.barrier_wait(bar.at[jax.lax.rem(g, stages)])


def staged(x, buffers, index):
    """`x` as a wgmma operand: itself on a GPU; in Mosaic GPU interpret mode, whose wgmma
    reads shared memory only, copied into `buffers.at[index]` (`buffers` is None on a
    GPU)."""
    if buffers is None:
        return x
    buffers.at[index][...] = x
    return buffers.at[index]


def block_first_keys(first_keys, smem, bar, issuer):
    """A query block's first keys (`first_keys`, a slice in global memory), copied into
    `smem` by warpgroup `issuer` and waited for by every warpgroup; then
    `(lo, mask_until)`, the key tile (of `tile` keys) of the block's first key and the
    tile after that of its last, as a function of `tile`. First keys do not decrease,
    so tiles before `lo` are seen by none of its rows, and from `mask_until` on by
    all (up to the diagonal)."""
    pl.when(jax.lax.axis_index("wg") == issuer)(
        lambda: plgpu.copy_gmem_to_smem(first_keys, smem, bar)
    )
    plgpu.barrier_wait(bar)
    return lambda tile: (smem[0] // tile, pl.cdiv(smem[smem.shape[0] - 1], tile))


def window_tiles(row0, n_rows, window, tile):
    """`block_first_keys`' `(lo, mask_until)` for `n_rows` queries from `row0` under a
    sliding window alone: the tile (of `tile` keys) of their first key, and the tile
    after that of their last, computed rather than read."""
    last = maths.window_first_key(row0 + n_rows - 1, window)
    return maths.window_first_key(row0, window) // tile, pl.cdiv(last, tile)


def window_query_tiles(key0, n_keys, window, tile, seq):
    """For `n_keys` keys from `key0` under a sliding window alone, in tiles of `tile`
    of `seq` queries: `(stop, mask_from)`, the tile after the last query that sees one
    of the keys, and the first tile with a query (past the keys) that does not see
    them all (`maths.key_block_reach`, computed rather than read). Query i sees key j
    when j <= i < j + window."""
    reach = lambda key: jnp.minimum(key + window, seq)  # queries whose first key <= key
    return pl.cdiv(reach(key0 + n_keys - 1), tile), reach(key0) // tile


def key_vector(ref, reduced_axis, interpret):
    """A vector of first keys in shared memory, in the layout of the scores' rows
    (`reduced_axis` 1) or columns (0) for broadcasting against them."""
    if interpret:  # the interpreter has no layouts
        return ref[...]
    return plgpu.load(ref, *load_index(), layout=plgpu.Layout.WGMMA.reduce(reduced_axis))


def load_index():
    """The index argument `plgpu.load` takes for a whole ref: required by jax 0.10,
    deprecated from 0.11."""
    return ((),) if _LOAD_NEEDS_INDEX else ()


_load_index = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_NEEDS_INDEX = _load_index is not None and _load_index.default is inspect.Parameter.empty
"""Whether `plgpu.load` requires the index as an argument (jax 0.10)."""


def write_back(*outputs, wait=True):
    """Each `(value, smem, dst)`: cast the accumulator `value` into its shared-memory
    buffer, then copy every buffer out to its global-memory slice `dst`; with `wait`,
    wait for the copies (else the caller waits before it reuses the buffers)."""
    for value, smem, _ in outputs:
        smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()
    for _, smem, dst in outputs:
        plgpu.copy_smem_to_gmem(smem, dst)
    if wait:
        plgpu.wait_smem_to_gmem(0)


def block_grid(blocks, block_name, n, ctas=None):
    """Launch grid and axis names for `blocks` blocks in each of `n` heads (rows of N);
    with `ctas`, a persistent kernel's: that many CUDA blocks on one axis
    (`persistent_items` says which blocks each takes).

    CUDA starts blocks with the last grid axis varying fastest. That axis is the head's
    block, so the blocks running at one time belong to a few heads and share those
    heads' streamed tiles in L2 (interleaving the heads made the kernels memory-bound;
    docs/benchmarks.md)."""
    if ctas is not None:
        return (ctas,), (PERSISTENT_AXIS,)
    return (n, blocks), ("n", block_name)


PERSISTENT_AXIS = "c"
"""The grid axis of a persistent kernel's CUDA blocks."""


def optional(x):
    """`(x,)`, or `()` for None: an optional kernel input among positional ones."""
    return () if x is None else (x,)


def fold_vmap(fn, *arrays):
    """`fn(*arrays)` for arrays whose leading axis `fn` treats as independent rows (the
    kernels' `N`). Pallas Mosaic GPU kernels have no batching rule, so under `jax.vmap`
    the mapped axis is folded into that leading axis instead of reaching the kernel."""

    @jax.custom_batching.custom_vmap
    def call(*xs):
        return fn(*xs)

    @call.def_vmap
    def _fold(axis_size, in_batched, *xs):
        whole = [
            x if mapped else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, mapped in zip(xs, in_batched, strict=True)
        ]
        outs = call(*(x.reshape(-1, *x.shape[2:]) for x in whole))
        outs = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return call(*arrays)


class _InGmem:
    """An initial value for `in_gmem`'s refs."""

    def __init__(self, value):
        self.value = value


def _gmem_ref_aval(init: _InGmem):
    return jax_private.gmem_ref_aval(init.value, plgpu.GMEM), init.value


def in_gmem(fn, *values):
    """The final values of refs in GPU global memory that start as `values` and that
    `fn(*refs)` updates (a kernel may add into them in place). Pure from the outside,
    so it may sit inside `custom_vmap` (`fold_vmap`), where `jax.new_ref` may not: JAX
    has no state rule for it. `pl.run_state`'s refs carry no memory space, which Mosaic
    GPU kernels need, hence an entry in JAX's private table; without that table,
    `jax.new_ref` (correct, but the caller then cannot be vmapped)."""
    mappings = jax_private.ref_type_mappings()
    if mappings is None:
        refs = [jax.new_ref(x, memory_space=plgpu.GMEM) for x in values]
        fn(*refs)
        return tuple(jax.freeze(r) for r in refs)
    mappings.setdefault(_InGmem, _gmem_ref_aval)
    return pl.run_state(lambda refs: fn(*refs))(tuple(_InGmem(x) for x in values))


def launch(kernel, scratch, out_type, grid, grid_names, interpret, *inputs):
    """Run `kernel(*input_and_output_refs, scratch_refs)` as a Mosaic GPU kernel with
    two compute warpgroups and one streaming, `scratch` allocated in shared memory for
    all three. An input may be a ref in GMEM (`in_gmem`), which the kernel updates in
    place.

    No shared memory is reserved for reductions across warps (Mosaic GPU reserves 2 KiB
    by default for any kernel that reduces): the only reductions, the softmax forward's
    row maxima and sums, run along rows of the WGMMA layout, within each warp. Those
    2 KiB are what the softmax forward needs for segments and windows at head dim 128."""

    def entry(*refs):
        pl.run_scoped(lambda *s: kernel(*refs, s), *scratch, collective_axes="wg")

    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg")
    return pl.kernel(
        entry,
        out_type=out_type,
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=jax_private.interpret_params() if interpret else False,
    )(*inputs)
