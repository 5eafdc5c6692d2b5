"""The gradient through swish and RoPE inside the Mosaic backward kernels' epilogues.

Attention sees queries and keys as `rope(swish(x))` (`maths.prepare`). A kernel that
owns rows of x (the dQ kernel its queries, the dK/dV kernel its keys) holds the
gradient w.r.t. the prepared rows in float32 registers at its end; `raw_gradient` turns
that into the gradient w.r.t. x, from x itself and each row's RoPE angles, so no pass
over memory is needed after the kernel.

RoPE rotates the interleaved pairs `(2i, 2i + 1)`. In the WGMMA register layout a pair
sits in one thread's two-element vector, so the pair swap RoPE's transpose needs is a
shuffle inside each register (`pair_shuffle`, written in Mosaic GPU itself since Pallas
has no such op); interpret mode, which has no layouts, swaps by reshaping.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import load_index

SWAP, FIRSTS, SECONDS = (1, 0), (0, 0), (1, 1)
"""`pair_shuffle` orders: swap each pair, or repeat its first or its second entry."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the backward kernels need to return gradients w.r.t. the raw queries and
    keys: `q` and `k`, the rows before swish and RoPE (the kernels' q and k rows,
    `(N, S, D)` and `(N_kv, S, D)`), `table`, the RoPE angles (`rope_pair_table`,
    `(T, S, D)` float32, query row n and its K/V row reading row `n // (N / T)`), and
    whether swish comes first."""

    q: jax.Array
    k: jax.Array
    table: jax.Array
    swish: bool

    def arrays(self):
        return self.q, self.k, self.table


def rope_pair_table(sin, cos):
    """`(..., S, D/2)` sine and cosine tables -> `(..., S, D)` float32 with each pair
    `(cos, sin)` of an angle where RoPE rotates a feature pair: what `raw_gradient`
    reads, one row per position."""
    return jnp.stack((cos, sin), axis=-1).reshape(*cos.shape[:-1], 2 * cos.shape[-1])


def pair_shuffle(x, order, interpret):
    """`x` (`(rows, D)`) with each pair of columns `(2i, 2i + 1)` rearranged as `order`
    says (`SWAP`, `FIRSTS`, `SECONDS`)."""
    if interpret:  # no layouts: reshape
        pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        return jnp.stack([pairs[..., i] for i in order], axis=-1).reshape(x.shape)
    return _shuffle_registers(x, order)


def _shuffle_registers(x, order):
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir.dialects import vector

    layout = plgpu.Layout.WGMMA
    x = plgpu.layout_cast(x, layout)

    @plgpu.inline_mgpu(
        arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(x.shape, x.dtype, layout)
    )
    def shuffle(ctx, array):
        del ctx
        registers = np.empty_like(array.registers)
        for index, register in np.ndenumerate(array.registers):
            registers[index] = vector.shuffle(register, register, list(order))
        return mgpu.FragmentedArray(
            _registers=registers, _layout=array.layout, _is_signed=array.is_signed
        )

    return shuffle(x)


def raw_gradient(grad, raw, table, swish, interpret):
    """The gradient w.r.t. `raw` (x, `(rows, D)`) of rows whose gradient w.r.t.
    `rope(swish(x))` is `grad` (float32), RoPE's angles given as `table` rows
    (`rope_pair_table`); `swish` False where the rows skip it."""
    cos = pair_shuffle(table, FIRSTS, interpret)
    sin = pair_shuffle(table, SECONDS, interpret)
    # RoPE^T on a pair (a, b): (a cos + b sin, b cos - a sin).
    columns = _iota(grad.shape, interpret)
    signed_sin = jnp.where(columns % 2 == 0, sin, -sin)
    out = grad * cos + pair_shuffle(grad, SWAP, interpret) * signed_sin
    if not swish:
        return out
    x = raw.astype(jnp.float32)
    gate = 0.5 * jnp.tanh(0.5 * x) + 0.5  # sigmoid(x)
    return out * (gate + x * gate * (1.0 - gate))  # swish'(x)


def _iota(shape, interpret):
    """Column indices of `shape`'s last axis."""
    if interpret:
        return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)
    return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def load_rows(src, smem, bar, interpret):
    """Rows in global memory (`src`, `(rows, D)`) as a register array in the WGMMA
    layout: read straight into registers on a GPU (no shared memory); interpreted,
    through `smem` (a copy waited for on `bar`)."""
    if interpret:
        plgpu.copy_gmem_to_smem(src, smem, bar)
        plgpu.barrier_wait(bar)
        return smem[...]
    return plgpu.load(src, *load_index(), layout=plgpu.Layout.WGMMA, optimized=False)


def epilogue(grad, raw_src, table_src, swish, interpret, smem=None):
    """`raw_gradient` of a kernel's own rows: `raw_src` and `table_src` are their slices
    in global memory; `smem` (interpret mode): `(raw, table, raw_bar, table_bar)`."""
    raw_smem, table_smem, raw_bar, table_bar = smem if interpret else (None,) * 4
    raw = load_rows(raw_src, raw_smem, raw_bar, interpret)
    table = load_rows(table_src, table_smem, table_bar, interpret)
    return raw_gradient(grad, raw, table, swish, interpret)


def own_smem(scratch, wg):
    """Compute warpgroup `wg`'s part of `scratch`'s refs, as `epilogue` takes it."""
    raw_smem, table_smem, bars = scratch
    return raw_smem.at[wg], table_smem.at[wg], bars.at[2 * wg], bars.at[2 * wg + 1]


def scratch(rows, dim, dtype, interpret):
    """The shared memory `epilogue` needs per compute warpgroup: none on a GPU."""
    if not interpret:
        return []
    return [
        plgpu.SMEM((2, rows, dim), dtype),
        plgpu.SMEM((2, rows, dim), jnp.float32),
        plgpu.Barrier(num_barriers=4),
    ]
