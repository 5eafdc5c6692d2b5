"""Kernels as ops that XLA partitions over their leading (batch) axes.

A Pallas or Mosaic kernel call has no partitioning rule of its own, so XLA gathers the
inputs of a sharded call onto every device. `per_shard(fn, *arrays, batch_ndim=n)`
wraps `fn` in `jax.experimental.custom_partitioning`: inputs sharded over any of their
first `n` axes stay so, each device runs `fn` on its shard, and the results carry the
same sharding. The other axes (sequence, features) are kept whole on each device.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from .base import SequenceLayout


def _axes(sharding, ndim: int) -> tuple:
    """The mesh axes of each of the first `ndim` axes of `sharding` (None: whole)."""
    spec = tuple(getattr(sharding, "spec", ()))
    return tuple(spec[i] if i < len(spec) else None for i in range(ndim))


def _sharded_like(mesh, shapes, leading: tuple):
    whole = lambda s: NamedSharding(
        mesh, PartitionSpec(*leading, *([None] * (len(s.shape) - len(leading))))
    )
    return jax.tree.map(whole, shapes)


def _sequence_layout(mesh, shape, axes, seq_axis: int) -> SequenceLayout | None:
    """The contiguous layout of a sequence axis sharded over mesh `axes`, or None when
    it is not sharded or its length is not a multiple of the device count."""
    if axes is None:
        return None
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    devices = math.prod(mesh.shape[name] for name in names)
    if devices == 1 or shape[seq_axis] % devices:
        return None
    return SequenceLayout(axes, devices, zigzag=False)


def per_shard(
    fn,
    *arrays,
    batch_ndim: int,
    over_sequence: Callable | None = None,
    group_ndim: int = 0,
    shared: int = 0,
):
    """`fn(*arrays)`, run shard by shard when the arrays are sharded over their first
    `batch_ndim` axes (shared by every array and result; `fn` returns a tuple of
    arrays). The last `shared` arrays may have size 1 on leading axes (broadcasting
    against the others', like a RoPE table shared by every head): sharded like the
    others along the leading axes where they are not 1, whole on every device where
    they are.

    With `over_sequence`, the next axis of every array and result (the sequence) may
    be sharded too: then each device runs `over_sequence(layout)` on its shards, a
    function like `fn` that may communicate over `layout.axis_name` (a contiguous
    `SequenceLayout`); of its results the op keeps as many as `fn` returns, in `fn`'s
    dtypes. A sequence whose length is not a multiple of the device count is gathered
    instead. `group_ndim` axes between the leading ones and the sequence are kept
    whole (the group axis of grouped-query heads: G for q, 1 for k and v).

    Under `jax.vmap` (custom_partitioning has no batching rule) the mapped axis
    becomes one more leading axis: `fn` takes any number of them.
    """
    if batch_ndim == 0 and over_sequence is None:
        return fn(*arrays)

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return _partitioned(fn, arrays, batch_ndim, over_sequence, group_ndim, shared)

    @call.def_vmap
    def _mapped_axis_in_front(axis_size, in_batched, *arrays):
        n_own = len(arrays) - shared

        def mapped(i, x, batched):
            if batched:
                return x
            return x[None] if i >= n_own else jnp.broadcast_to(x, (axis_size, *x.shape))

        arrays = [mapped(i, x, b) for i, (x, b) in enumerate(zip(arrays, in_batched))]
        results = per_shard(
            fn,
            *arrays,
            batch_ndim=batch_ndim + 1,
            over_sequence=over_sequence,
            group_ndim=group_ndim,
            shared=shared,
        )
        return results, jax.tree.map(lambda _: True, results)

    return call(*arrays)


def _partitioned(fn, arrays, batch_ndim, over_sequence, group_ndim=0, shared=0):
    results = jax.eval_shape(fn, *arrays)
    sequence = over_sequence is not None
    group_ndim = group_ndim if sequence else 0  # otherwise they are whole anyway
    n_own = len(arrays) - shared

    # Shardy: the leading axes pass through (b0, b1, ...; a shared array's axes of size
    # 1 among them are factors of their own, kept whole), and the sequence when
    # `over_sequence` (after `group_ndim` axes); every other axis stays whole.
    batch = arrays[0].shape[:batch_ndim]
    factors, mappings = [], []
    for group in (arrays, results):
        parts = []
        for i, x in enumerate(group):
            leading = []
            for j in range(batch_ndim):
                if x.shape[j] == batch[j]:
                    leading.append(f"b{j}")
                elif group is arrays and i >= n_own and x.shape[j] == 1:
                    leading.append(f"u{len(factors)}")  # a shared array's axis of size 1
                    factors.append(leading[-1])
                else:
                    raise ValueError(f"per_shard: leading axes {x.shape[:batch_ndim]}, not {batch}")
            names = [f"f{len(factors) + i}" for i in range(x.ndim - batch_ndim - sequence)]
            factors += names
            axes = [*names[:group_ndim], *(["s"] if sequence else []), *names[group_ndim:]]
            parts.append(" ".join([*leading, *axes]))
        mappings.append(", ".join(parts))
    rule = f"{mappings[0]} -> {mappings[1]}"
    seq_axis = batch_ndim + group_ndim
    kept = seq_axis + sequence

    def placement(mesh, arg_shapes):
        axes = _axes(arg_shapes[0].sharding, kept)
        layout = None
        if sequence:
            layout = _sequence_layout(mesh, arg_shapes[0].shape, axes[-1], seq_axis)
            whole = (None,) * group_ndim
            axes = (*axes[:batch_ndim], *whole, layout.axis_name if layout else None)
        return axes, layout

    def infer(mesh, arg_shapes, result_shapes):
        return _sharded_like(mesh, result_shapes, placement(mesh, arg_shapes)[0])

    def arg_shardings(mesh, arg_shapes, axes):
        def shared_sharding(x):  # whole along its axes of size 1
            lead = [a if x.shape[j] == batch[j] else None for j, a in enumerate(axes[:batch_ndim])]
            rest = [None] * (len(x.shape) - len(axes))
            return NamedSharding(mesh, PartitionSpec(*lead, *axes[batch_ndim:], *rest))

        own = _sharded_like(mesh, arg_shapes[:n_own], axes)
        return (*own, *(shared_sharding(x) for x in arg_shapes[n_own:]))

    def like_results(shard_fn):
        # `over_sequence` may compute in other dtypes, or more: the op's results are fn's.
        return lambda *xs: tuple(x.astype(r.dtype) for x, r in zip(shard_fn(*xs), results))

    def partition(mesh, arg_shapes, result_shapes):
        axes, layout = placement(mesh, arg_shapes)
        return (
            mesh,
            fn if layout is None else like_results(over_sequence(layout)),
            _sharded_like(mesh, result_shapes, axes),
            arg_shardings(mesh, arg_shapes, axes),
        )

    op = custom_partitioning(fn)
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(factors),
    )
    return op(*arrays)
