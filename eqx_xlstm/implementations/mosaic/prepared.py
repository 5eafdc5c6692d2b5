"""The gradient through swish and RoPE inside the Mosaic backward kernels' epilogues.

Attention sees queries and keys as `rope(swish(x))` (`maths.prepare`). A kernel that
owns rows of x (the dQ kernel its queries, the dK/dV kernel its keys) holds the
gradient w.r.t. the prepared rows in float32 registers at its end; `raw_gradient` turns
that into the gradient w.r.t. x, from x itself and each row's RoPE angles, so no pass
over memory is needed after the kernel. The dK/dV pair copies its raw rows and
angles into shared memory of their own with its first copies (`copy_early`); the dQ
kernel (no shared memory to spare at D=128) and the fused kernel (whose dQ sums across
blocks, finished in XLA) read them after their loops (`loaded_gradient`).

RoPE rotates the interleaved pairs `(2i, 2i + 1)`. In the WGMMA register layout a pair
sits in one thread's two-element vector, with the pair of its angle's `(cos, sin)` in
the matching register of the table. On a GPU the whole epilogue is written register by
register in Mosaic GPU itself (`plgpu.inline_mgpu`: Pallas has no op that swaps within
a pair), so that only one register of each operand is in flight at a time; interpret
mode, which has no layouts, and XLA (after the fused kernel) use the array form.
"""

import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..raw_rows import from_bits
from ..raw_rows import raw_gradient as array_raw_gradient
from . import jax_private
from .common import load_index, tiled_smem


def raw_gradient(grad, raw, table, swish, interpret):
    """`raw_rows.raw_gradient` inside a kernel: the register form on a GPU, the array
    form in interpret mode (no layouts)."""
    if interpret:
        return array_raw_gradient(grad, raw, table, swish)
    return _register_gradient(grad, raw, table, swish)


def _register_gradient(grad, raw, table, swish):
    """`raw_gradient` inside a kernel, one WGMMA register (a feature pair) at a time."""
    import jax.experimental.mosaic.gpu as mgpu

    ir, arith, llvm, vector = jax_private.mlir_modules()

    layout = plgpu.Layout.WGMMA
    grad, raw, table = (plgpu.layout_cast(x, layout) for x in (grad, raw, table))

    @plgpu.inline_mgpu(
        arg_types=(layout, layout, layout),
        return_type=plgpu.ShapeDtypeStruct(grad.shape, jnp.float32, layout),
    )
    def epilogue(ctx, grad, raw, table):
        del ctx
        f32 = ir.F32Type.get()
        pair = ir.VectorType.get((2,), f32)
        if ir.VectorType(grad.registers.flat[0].type) != pair:
            raise NotImplementedError(f"unexpected registers {grad.registers.flat[0].type}")

        def const(*values):
            values = np.asarray(values, np.float32)
            return arith.constant(pair, ir.DenseElementsAttr.get(values, type=pair))

        def tanh(v):  # tanh.approx.f32 of each entry (as approx_math gives Pallas)
            out = llvm.mlir_undef(pair)
            for i in range(2):
                position = ir.DenseI64ArrayAttr.get([i])
                entry = vector.extract(v, dynamic_position=[], static_position=position)
                entry = llvm.inline_asm(f32, [entry], "tanh.approx.f32 $0, $1;", "=f,f")
                out = vector.insert(entry, out, dynamic_position=[], static_position=position)
            return out

        half, one, signs = const(0.5, 0.5), const(1.0, 1.0), const(1.0, -1.0)
        registers = np.empty_like(grad.registers)
        for index, g in np.ndenumerate(grad.registers):
            angle = table.registers[index]
            cos = vector.shuffle(angle, angle, [0, 0])
            sin = arith.mulf(vector.shuffle(angle, angle, [1, 1]), signs)
            out = arith.addf(arith.mulf(g, cos), arith.mulf(vector.shuffle(g, g, [1, 0]), sin))
            if swish:
                x = arith.extf(pair, raw.registers[index])
                gate = arith.addf(arith.mulf(half, tanh(arith.mulf(half, x))), half)
                slope = arith.addf(one, arith.mulf(x, arith.subf(one, gate)))
                out = arith.mulf(out, arith.mulf(gate, slope))
            registers[index] = out
        return mgpu.FragmentedArray(_registers=registers, _layout=grad.layout, _is_signed=None)

    return epilogue(grad, raw, table)


def load_rows(src, smem, bar, interpret):
    """Rows in global memory (`src`, `(rows, D)`) as a register array in the WGMMA
    layout: read straight into registers on a GPU (no shared memory); interpreted,
    through `smem` (a copy waited for on `bar`)."""
    if interpret:
        plgpu.copy_gmem_to_smem(src, smem, bar)
        plgpu.barrier_wait(bar)
        return smem[...]
    return plgpu.load(src, *load_index(), layout=plgpu.Layout.WGMMA, optimized=False)


def loaded_gradient(grad, raw_src, table_src, swish, interpret, smem=None):
    """`raw_gradient` of a kernel's own rows read from global memory after its loop:
    `raw_src` and `table_src` (bits) are their slices there; `smem` (interpret mode):
    `(raw, table, raw_bar, table_bar)`, `own_smem` of `loaded_scratch`."""
    raw_smem, table_smem, raw_bar, table_bar = smem if interpret else (None,) * 4
    raw = load_rows(raw_src, raw_smem, raw_bar, interpret)
    table = from_bits(load_rows(table_src, table_smem, table_bar, interpret))
    return raw_gradient(grad, raw, table, swish, interpret)


def own_smem(scratch, wg):
    """Compute warpgroup `wg`'s part of `loaded_scratch`'s or `early_scratch`'s refs:
    `(raw, table, raw_bar, table_bar)`."""
    raw_smem, table_smem, bars = scratch
    return raw_smem.at[wg], table_smem.at[wg], bars.at[2 * wg], bars.at[2 * wg + 1]


def loaded_scratch(rows, dim, dtype, interpret):
    """The shared memory `loaded_gradient` needs per compute warpgroup: none on a GPU."""
    if not interpret:
        return []
    return [
        plgpu.SMEM((2, rows, dim), dtype),
        plgpu.SMEM((2, rows, dim), dtype),
        plgpu.Barrier(num_barriers=4),
    ]


def early_scratch(rows, dim, dtype):
    """Shared memory of each compute warpgroup's own for `copy_early`."""
    return [
        tiled_smem((2, rows, dim), dtype),
        tiled_smem((2, rows, dim), dtype),
        plgpu.Barrier(num_barriers=4),
    ]


def copy_early(raw_src, table_src, smem):
    """Start copying a block's rows (`raw_src`) and angles (`table_src`, bits) into
    `smem` (`own_smem` of `early_scratch`) with its first copies, so that they have
    landed by its end: a read after the loop is a round trip to memory that nothing
    hides, one block running per SM."""
    raw_smem, table_smem, raw_bar, table_bar = smem
    plgpu.copy_gmem_to_smem(raw_src, raw_smem, raw_bar)
    plgpu.copy_gmem_to_smem(table_src, table_smem, table_bar)


def copied_gradient(grad, swish, interpret, smem):
    """`raw_gradient` from what `copy_early` copied into `smem`."""
    raw_smem, table_smem, raw_bar, table_bar = smem
    plgpu.barrier_wait(raw_bar)
    plgpu.barrier_wait(table_bar)
    return raw_gradient(grad, raw_smem[...], from_bits(table_smem[...]), swish, interpret)
