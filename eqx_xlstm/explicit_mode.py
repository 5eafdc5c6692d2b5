"""Attention on inputs typed as sharded (JAX's explicit sharding mode, mesh axes of type
`AxisType.Explicit`): each device's shard runs inside `jax.shard_map`.

Explicit axes put the sharding in the arrays' types, which an op JAX cannot type (a
Pallas or Mosaic call, a `custom_partitioning` op) refuses. So `dispatch.run` hands such
inputs here: over leading (batch, heads) axes every device runs the chosen path on its
shard, with no communication; over the sequence axis the shards run as context-parallel
attention (`ring`: k/v shards around the devices in the zig-zag layout, or the linear
form's state prefix for 'none'), the pieces in the chosen implementation's kernels.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from . import maths
from .implementations import ring
from .implementations.base import SequenceLayout
from .implementations.linear import Linear
from .spec import AttentionSpec


def typed_spec(x) -> tuple | None:
    """The PartitionSpec in `x`'s type when it is sharded over Explicit mesh axes; None
    otherwise (Auto axes type no sharding)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None or all(entry is None for entry in spec):
        return None
    return tuple(spec)


def _check_supported(typed: tuple, mask) -> None:
    """A ValueError, naming the argument, for shardings this mode cannot run (`typed`:
    one entry per axis of the queries)."""
    if typed[-1] is not None:
        raise ValueError(
            f"`queries` sharded over the feature (last) axis, {typed}, is not supported: "
            "shard the leading (batch, heads) or the sequence axis."
        )
    if typed[-2] is not None and mask is not None:
        raise ValueError(
            "`attention_mask` with queries sharded over the sequence axis is not "
            "supported: context parallelism is causal (attention_mask=None)."
        )


def _along_leading(x, ndim: int, leading: tuple, like: tuple, sequence=None):
    """`x` (broadcasting against the leading axes of an array of shape `like`) with
    `ndim` axes, and its PartitionSpec: `leading`'s mesh axes where it has `like`'s
    size, replicated where it broadcasts (size 1), then `sequence`'s on the next axis
    (per-position arrays of a sharded sequence), the rest whole."""
    x = x.reshape((1,) * (ndim - x.ndim) + x.shape)
    entries = [axis if x.shape[i] == like[i] else None for i, axis in enumerate(leading)]
    rest = [None] * (ndim - len(leading))
    if sequence is not None:
        rest[0] = sequence
    spec = PartitionSpec(*entries, *rest)
    return jax.sharding.reshard(x, spec), spec


def run_sharded(
    q, k, v, mask, sin, cos, extras, *, typed: tuple, spec: AttentionSpec, chosen, run_local
):
    """Attention of inputs typed as sharded like `q` (`typed`, its `typed_spec`):
    `run_local(q, k, v, mask, sin, cos, extras, spec=...)` on each device's shard of the
    leading axes; a ring when the sequence axis is sharded too. k and v are resharded
    like q where they differ. `extras` (first keys, an array bias) and per-position
    tables (segments) are split along the leading axes where they have q's sizes."""
    typed = typed + (None,) * (q.ndim - len(typed))
    _check_supported(typed, mask)
    leading, sequence = typed[:-2], typed[-2]
    rows = PartitionSpec(*leading, sequence, None)
    mesh = jax.typeof(q).sharding.mesh
    reshard = jax.sharding.reshard
    q, k, v = (reshard(x, rows) for x in (q, k, v))
    if sin.ndim == 2:
        tables = PartitionSpec(sequence, None)
        sin, cos = (reshard(x, tables) for x in (sin, cos))
    else:  # read at restarted positions: a leading shape of their own
        (sin, tables), (cos, _) = (
            _along_leading(x, q.ndim, leading, q.shape, sequence) for x in (sin, cos)
        )
    if mask is not None:
        mask = reshard(mask, PartitionSpec())
    # First keys broadcast against k's batch axes and the sequence (sharded like it),
    # the bias against q's batch axes.
    placed, extra_specs = [], []
    for x, ndim, like, seq in zip(
        extras, (q.ndim - 1, q.ndim - 2), (k.shape, q.shape), (sequence, None)
    ):
        x, x_spec = (None, None) if x is None else _along_leading(x, ndim, leading, like, seq)
        placed.append(x)
        extra_specs.append(x_spec)

    def local(q, k, v, mask, sin, cos, extras):
        local_spec = spec.replace(batch_shape=q.shape[:-2])
        if sequence is None:
            return run_local(q, k, v, mask, sin, cos, tuple(extras), spec=local_spec)
        return _sequence_parallel(q, k, v, sin, cos, extras, local_spec, sequence, chosen.gradient)

    mask_spec = None if mask is None else PartitionSpec()
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, mask_spec, tables, tables, extra_specs),
        out_specs=rows,
        check_vma=False,
    )(q, k, v, mask, sin, cos, placed)


def _sequence_parallel(q, k, v, sin, cos, extras, spec, axis_name, implementation):
    """Causal attention of this device's contiguous shards of a sequence sharded over
    `axis_name` (RoPE tables sharded alike, so positions are global; `extras`: each
    query's first visible key in global positions, and an array sigmoid bias, each or
    None). Grouped-query heads: k and v are repeated to q's heads (the ring's pieces
    then see plain heads). An array bias becomes one more feature of q and k
    (`maths.bias_as_feature`), run in the blockwise XLA pieces."""
    first_key, bias = extras
    accum = spec.accum_dtype
    q, k = (maths.prepare(x, spec.pre_activation, sin, cos, accum) for x in (q, k))
    v = v.astype(spec.dtype)
    if spec.kv_groups > 1:
        k, v = (jnp.repeat(x, spec.kv_groups, axis=-3) for x in (k, v))
    if bias is not None:
        q, k = maths.bias_as_feature(q, k, bias, spec.scale)
    spec = spec.replace(kv_groups=1, array_bias=False)
    devices = jax.lax.axis_size(axis_name)
    layout = SequenceLayout(axis_name, devices, zigzag=False)
    if spec.activation == "none" and first_key is None:  # one D x DV state a device
        out = ring.linear_prefix(q, k, v, spec, layout, lambda *xs: Linear()(*xs, None))
        return out.astype(spec.dtype)
    pieces = implementation.ring_pieces()
    if first_key is not None:  # segments, windows
        first_key = jnp.broadcast_to(first_key, k.shape[:-1])
    if pieces is None or not ring.takes(pieces, spec) or bias is not None:
        pieces = ring.BlockwisePieces()
    return ring.balanced_attention(q, k, v, spec, layout, pieces, first_key)
