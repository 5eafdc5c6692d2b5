"""Swish and RoPE over 16-bit queries or keys (`maths.prepare`) as one Pallas kernel
lowered by Triton: the pass in front of the GPU attention kernels at long sequences.

XLA's fusion of the same maths reads the RoPE tables for every head anew; at 16 MiB of
float32 tables (S=32768, D=128) that pass falls well below the speed of a plain copy,
most likely as the tables no longer stay in L2. This kernel runs the programs of one block of
positions, one per row (head), side by side, so each block of the tables is read from
memory once; and it reads and writes each feature pair `(2i, 2i + 1)`, which RoPE
rotates together, as one 32-bit word. Its results equal XLA's (float32 maths, rounded
once). The pass's gradient w.r.t. the rows (RoPE transposed, then swish') is a second
kernel of the same form. `prepared`, `prepared_gradient` and `differentiable_prepared`
run them shard by shard (`per_shard`), with XLA's pass where a shard does not `fit`.
docs/benchmarks.md ("Issue #10", tenth and eleventh parts) has the measurements."""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import maths
from .per_shard import per_shard

ROWS = 32  # positions per program
# Warps per program of the pass and of its gradient (which reads two arrays): each near
# the fastest of 16-128 positions with 2-8 warps at S=32768 (docs/benchmarks.md, issue
# #10's eleventh part).
WARPS = 4
GRADIENT_WARPS = 8
TABLE_BYTES_FROM = 16 << 20
"""The kernel runs where the float32 tables (sine and cosine) take at least this many
bytes (S * D * 4: S=32768 at D=128), where it measured faster than XLA's pass; at
smaller tables the two were level (`benchmarks/rope_pass.py`)."""


def fits(x_shape, dtype, table_shape) -> bool:
    """Whether `prepare_rows` takes x of `(..., S, D)` in `dtype` with tables of
    `(..., S, D/2)` (both with every leading axis) and is the faster pass: a 16-bit
    float, S a multiple of `ROWS`, D/2 a power of two, tables of at least
    `TABLE_BYTES_FROM` that vary along leading axes of x only (`_table_rows`)."""
    seq, dim = x_shape[-2:]
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and seq % ROWS == 0
        and dim % 2 == 0
        and math.log2(dim // 2).is_integer()
        and seq * dim * 4 >= TABLE_BYTES_FROM
        and _table_rows(x_shape[:-2], table_shape[:-2]) is not None
    )


def serves(spec, x_shape, table_shape) -> bool:
    """Whether the attention call of `spec` (its inputs `(..., S, D)`, tables
    `(..., S, D/2)` of the same rank) runs its swish + RoPE pass through this kernel:
    on a GPU, where it `fits`."""
    return spec.platform == "gpu" and fits(x_shape, spec.dtype, table_shape)


def _table_rows(x_lead, table_lead):
    """How many table rows `(T, S, D/2)` the tables make when x's leading axes are
    flattened to N rows (row n reading table row `n // (N / T)`), or None where they
    vary along an axis after one they share (size 1)."""
    if len(table_lead) > len(x_lead):
        return None
    table_lead = (1,) * (len(x_lead) - len(table_lead)) + tuple(table_lead)
    varying = len(table_lead)
    while varying and table_lead[varying - 1] == 1:
        varying -= 1
    if tuple(table_lead[:varying]) != tuple(x_lead[:varying]):
        return None
    return math.prod(table_lead[:varying])


def prepare_rows(x, pre_activation: str, sin, cos, *, interpret: bool | None = None):
    """`maths.prepare(x, pre_activation, sin, cos, float32)` in x's dtype, for x and
    tables that `fits` (but for the size); `interpret` runs the kernel in Pallas
    interpret mode (None: where the default device is not a GPU, as in tests)."""
    kernel = functools.partial(_prepare_kernel, swish=pre_activation != "none", dtype=x.dtype)
    name = "swish_rope" if pre_activation != "none" else "rope"
    return _pairwise(kernel, name, (x,), sin, cos, interpret, WARPS)


def prepare_rows_gradient(x, d_out, pre_activation: str, sin, cos, *, interpret=None):
    """The gradient of `prepare_rows` w.r.t. x (`d_out`: w.r.t. its output, in x's
    dtype), as XLA's of the same float32 maths, in x's dtype: RoPE transposed, then
    swish'. For x and tables that `fits`; `interpret` as in `prepare_rows`."""
    kernel = functools.partial(_gradient_kernel, swish=pre_activation != "none", dtype=x.dtype)
    d_out = d_out.astype(x.dtype)
    if pre_activation == "none":  # x is not read
        return _pairwise(kernel, "rope_gradient", (d_out,), sin, cos, interpret, GRADIENT_WARPS)
    return _pairwise(kernel, "swish_rope_gradient", (x, d_out), sin, cos, interpret, GRADIENT_WARPS)


def _pairwise(kernel, name, xs, sin, cos, interpret, warps):
    """`kernel(*row_refs, sin_ref, cos_ref, out_ref)` over rows `xs` (one shape and
    16-bit dtype, `(..., S, D)`) viewed as words of a feature pair each, with the
    tables as float32 `(T, S, D/2)`: one result like `xs[0]`."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    x = xs[0]
    *lead, seq, dim = x.shape
    n_tables = _table_rows(tuple(lead), sin.shape[:-2])
    words = [jax.lax.bitcast_convert_type(r.reshape(-1, seq, dim // 2, 2), jnp.uint32) for r in xs]
    sin, cos = (t.astype(jnp.float32).reshape(n_tables, seq, dim // 2) for t in (sin, cos))
    n, _, pairs = words[0].shape
    every = n // n_tables  # rows per table row
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=warps, num_stages=1)
    rows = pl.BlockSpec((None, ROWS, pairs), lambda r, i: (r, i, 0))
    table = pl.BlockSpec((None, ROWS, pairs), lambda r, i: (r // every, i, 0))
    # The rows vary fastest (the first grid axis): the programs running at one time
    # share a block of the tables.
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(words[0].shape, jnp.uint32),
        grid=(n, seq // ROWS),
        in_specs=[rows] * len(words) + [table, table],
        out_specs=rows,
        interpret=interpret,
        compiler_params=params,
        name=name,
    )(*words, sin, cos)
    return jax.lax.bitcast_convert_type(out, x.dtype).reshape(x.shape)


def _prepare_kernel(words_ref, sin_ref, cos_ref, out_ref, *, swish, dtype):
    first, second = _pair(words_ref[...], dtype)
    if swish:
        first, second = (x * _sigmoid(x) for x in (first, second))
    sin, cos = sin_ref[...], cos_ref[...]
    out_ref[...] = _word(first * cos - second * sin, second * cos + first * sin, dtype)


def _gradient_kernel(*refs, swish, dtype):
    *words_ref, d_words_ref, sin_ref, cos_ref, out_ref = refs  # x's words with swish
    d_first, d_second = _pair(d_words_ref[...], dtype)
    sin, cos = sin_ref[...], cos_ref[...]
    # RoPE's transpose: the rotation by minus the angle.
    first, second = d_first * cos + d_second * sin, d_second * cos - d_first * sin
    if swish:  # swish'(x) = s + x s (1 - s), s = sigmoid(x)
        x_first, x_second = _pair(words_ref[0][...], dtype)
        s_first, s_second = _sigmoid(x_first), _sigmoid(x_second)
        first = first * (s_first + x_first * s_first * (1.0 - s_first))
        second = second * (s_second + x_second * s_second * (1.0 - s_second))
    out_ref[...] = _word(first, second, dtype)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _pair(words, dtype):
    """A word's feature pair `(2i, 2i + 1)` as float32 (2i in the low half)."""
    return tuple(_unpack(half, dtype) for half in (words & 0xFFFF, words >> 16))


def _word(first, second, dtype):
    return _pack(first, dtype) | (_pack(second, dtype) << 16)


def _unpack(bits, dtype):
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), dtype).astype(jnp.float32)


def _pack(x, dtype):
    return jax.lax.bitcast_convert_type(x.astype(dtype), jnp.uint16).astype(jnp.uint32)


def _xla_prepared(x, sin, cos, pre_activation):
    """`maths.prepare` in float32 as XLA runs it, rounded to x's (16-bit) dtype: what
    `prepare_rows` computes."""
    return maths.prepare(x, pre_activation, sin, cos, jnp.float32).astype(x.dtype)


def prepared(x, pre_activation: str, sin, cos, *, batch_ndim: int, group_ndim: int = 0):
    """`maths.prepare(x, ...)` in x's dtype (16-bit, on a GPU), shard by shard: through
    the Triton kernel where `fits` each device's shard, else XLA's pass.
    Swish and RoPE go row by row, so the sequence may be sharded too; the tables
    (`(..., S, D/2)`, of x's rank) are sharded like x where they vary."""

    def prepare(x, sin, cos):
        if fits(x.shape, x.dtype, sin.shape):
            return (prepare_rows(x, pre_activation, sin, cos),)
        return (_xla_prepared(x, sin, cos, pre_activation),)

    return _row_by_row(prepare, x, sin, cos, batch_ndim=batch_ndim, group_ndim=group_ndim)


def prepared_gradient(x, d_out, pre_activation: str, sin, cos, *, batch_ndim: int, group_ndim=0):
    """The gradient of `prepared` w.r.t. x (`d_out`: w.r.t. its result), shard by shard
    like it: through the Triton kernel where `fits`, else XLA's."""

    def gradient(x, d_out, sin, cos):
        if fits(x.shape, x.dtype, sin.shape):
            return (prepare_rows_gradient(x, d_out, pre_activation, sin, cos),)
        prepare = lambda x: _xla_prepared(x, sin, cos, pre_activation)
        return jax.vjp(prepare, x)[1](d_out.astype(x.dtype))

    return _row_by_row(gradient, x, d_out, sin, cos, batch_ndim=batch_ndim, group_ndim=group_ndim)


def _row_by_row(fn, *arrays, batch_ndim: int, group_ndim: int):
    """`fn(*arrays)`'s one result, shard by shard (`per_shard`): `fn` works row by row,
    so the sequence may be sharded too; the last two arrays are the tables."""
    options = dict(batch_ndim=batch_ndim, group_ndim=group_ndim, shared=2)
    return per_shard(fn, *arrays, over_sequence=lambda layout: fn, **options)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 5))
def differentiable_prepared(x, pre_activation: str, sin, cos, batch_ndim: int, group_ndim: int):
    """`prepared`, differentiable: the gradient w.r.t. x is `prepared_gradient`'s, the
    tables' XLA's (dropped by XLA where unused, as for constant tables)."""
    return prepared(x, pre_activation, sin, cos, batch_ndim=batch_ndim, group_ndim=group_ndim)


def _differentiable_prepared_fwd(x, pre_activation, sin, cos, batch_ndim, group_ndim):
    out = prepared(x, pre_activation, sin, cos, batch_ndim=batch_ndim, group_ndim=group_ndim)
    return out, (x, sin, cos)


def _differentiable_prepared_bwd(pre_activation, batch_ndim, group_ndim, residuals, d_out):
    x, sin, cos = residuals
    options = dict(batch_ndim=batch_ndim, group_ndim=group_ndim)
    d_x = prepared_gradient(x, d_out, pre_activation, sin, cos, **options)
    prepare = lambda sin, cos: _xla_prepared(x, sin, cos, pre_activation)
    return (d_x, *jax.vjp(prepare, sin, cos)[1](d_out))


differentiable_prepared.defvjp(_differentiable_prepared_fwd, _differentiable_prepared_bwd)
