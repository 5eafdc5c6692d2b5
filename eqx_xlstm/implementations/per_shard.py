"""Kernels as ops that XLA partitions over their leading (batch) axes.

A Pallas or Mosaic kernel call has no partitioning rule of its own, so XLA gathers the
inputs of a sharded call onto every device. `per_shard(fn, *arrays, batch_ndim=n)`
wraps `fn` in `jax.experimental.custom_partitioning`: inputs sharded over any of their
first `n` axes stay so, each device runs `fn` on its shard, and the results carry the
same sharding. The other axes (sequence, features) are kept whole on each device.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ..spec import AttentionSpec
from .base import as_rows, from_rows


def _leading(sharding, batch_ndim: int) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()))
    return tuple(spec[i] if i < len(spec) else None for i in range(batch_ndim))


def _sharded_like(mesh, shapes, leading: tuple):
    whole = lambda s: NamedSharding(
        mesh, PartitionSpec(*leading, *([None] * (len(s.shape) - len(leading))))
    )
    return jax.tree.map(whole, shapes)


def per_shard(fn, *arrays, batch_ndim: int):
    """`fn(*arrays)`, run shard by shard when the arrays are sharded over their first
    `batch_ndim` axes (shared by every array and result; `fn` returns a tuple of
    arrays)."""
    if batch_ndim == 0:
        return fn(*arrays)
    results = jax.eval_shape(fn, *arrays)

    # Shardy: the leading axes pass through; every other axis stays whole.
    factors, mappings = [], []
    for group in (arrays, results):
        parts = []
        for x in group:
            names = [f"f{len(factors) + i}" for i in range(x.ndim - batch_ndim)]
            factors += names
            parts.append(" ".join(["...", *names]))
        mappings.append(", ".join(parts))
    rule = f"{mappings[0]} -> {mappings[1]}"

    def infer(mesh, arg_shapes, result_shapes):
        return _sharded_like(mesh, result_shapes, _leading(arg_shapes[0].sharding, batch_ndim))

    def partition(mesh, arg_shapes, result_shapes):
        leading = _leading(arg_shapes[0].sharding, batch_ndim)
        return (
            mesh,
            fn,
            _sharded_like(mesh, result_shapes, leading),
            _sharded_like(mesh, arg_shapes, leading),
        )

    op = custom_partitioning(fn)
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(factors),
    )
    return op(*arrays)


@dataclasses.dataclass(frozen=True, eq=False)
class RowKernels:
    """Kernels over rows `(N, S', D)` (`as_rows`' layout): `forward(q, k, v)` returns a
    tuple whose first entry is the output, the rest what the backward needs;
    `backward(q, k, v, *forward_outputs, d_out)` returns `(dq, dk, dv)`. Without a
    backward, differentiating raises ValueError(`no_backward`)."""

    forward: Callable
    backward: Callable | None
    spec: AttentionSpec
    multiple: int
    """The kernels' sequence block: rows are zero-padded to a multiple of it."""
    no_backward: str = ""
    partition: bool = True
    """Run per shard; False for kernels XLA cannot partition as a custom op (Mosaic GPU
    interpret mode, whose callbacks have ordered effects)."""

    def batch_ndim(self, q) -> int:
        """How many leading axes of `q` `per_shard` partitions over."""
        return q.ndim - 2 if self.partition else 0


def row_attention(kernels: RowKernels, q, k, v):
    """Differentiable attention of `(*batch, S, D)` inputs through `kernels`, each pass
    one op per device's shard of the leading axes (`per_shard`)."""
    return _row_attention(q, k, v, kernels)


def _forward_outputs(kernels: RowKernels, q, k, v):
    spec, multiple = kernels.spec, kernels.multiple

    def fn(q, k, v):
        batch = q.shape[:-2]
        outs = kernels.forward(*(as_rows(x, spec, multiple) for x in (q, k, v)))
        return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)  # rows kept padded

    return per_shard(fn, q, k, v, batch_ndim=kernels.batch_ndim(q))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_attention(q, k, v, kernels):
    return _forward_outputs(kernels, q, k, v)[0][..., : kernels.spec.seq_len, :]


def _row_attention_fwd(q, k, v, kernels):
    if kernels.backward is None:
        raise ValueError(kernels.no_backward)
    outs = _forward_outputs(kernels, q, k, v)
    return outs[0][..., : kernels.spec.seq_len, :], (q, k, v, outs)


def _row_attention_bwd(kernels, residuals, d_out):
    q, k, v, outs = residuals
    spec, multiple = kernels.spec, kernels.multiple
    dtypes = (q.dtype, k.dtype, v.dtype)

    def fn(q, k, v, d_out, *outs):
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, multiple) for x in (q, k, v, d_out)]
        outs = [o.reshape(-1, *o.shape[len(batch) :]) for o in outs]
        grads = kernels.backward(*rows[:3], *outs, rows[3])
        return tuple(from_rows(g, batch, spec).astype(t) for g, t in zip(grads, dtypes))

    return per_shard(fn, q, k, v, d_out, *outs, batch_ndim=kernels.batch_ndim(q))


_row_attention.defvjp(_row_attention_fwd, _row_attention_bwd)
