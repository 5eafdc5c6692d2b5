"""Attention through row kernels (`RowKernels`: a forward and a backward over `(N, S,
D)` rows) as a differentiable op on `(*batch, S, D)` inputs: padded to the kernels'
block, each pass one op per device's shard of the leading axes (`per_shard.per_shard`),
context-parallel pieces where the sequence is sharded, and (`rope`) queries and keys
that come before swish and RoPE for kernels that return the raw rows' gradients."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import maths
from ..spec import AttentionSpec
from . import prepare_pass, ring
from .base import as_rows, from_rows
from .per_shard import per_shard
from .raw_rows import Prepared, raw_gradient, rope_pair_table


@dataclasses.dataclass(frozen=True, eq=False)
class RowKernels:
    """Kernels over rows `(N, S', D)` (`as_rows`' layout): `forward(q, k, v,
    *first_key)` returns a tuple whose first entry is the output, the rest what the
    backward needs; `backward(q, k, v, *forward_outputs, d_out, first_key=first_key)`
    returns `(dq, dk, dv)`. Without a backward, differentiating raises
    ValueError(`no_backward`). With grouped-query heads (`spec.kv_groups` G > 1) q has
    G rows per row of k and v; `first_key` (bounded specs) is `(N_kv, S')`, padded at
    the end with its last entry. With `spec.array_bias` both also take `bias=`, each
    q row's bias at every position `(N, S')` float32, and the backward returns its
    gradient, alike, after dv."""

    forward: Callable
    backward: Callable | None
    spec: AttentionSpec
    multiple: int
    """The kernels' sequence block: rows are zero-padded to a multiple of it."""
    no_backward: str = ""
    partition: bool = True
    """Run per shard; False for kernels XLA cannot partition as a custom op (Mosaic GPU
    interpret mode, whose callbacks have ordered effects)."""
    sequence_pieces: Any = None
    """The pieces (`ring.BlockwisePieces` or kernels) of context-parallel attention when
    the sequence is sharded; None gathers it. Used when S is a multiple of `multiple`
    (the kernels' padded residuals are then the unpadded sequence)."""

    def batch_ndim(self, q) -> int:
        """How many leading axes of `q` `per_shard` partitions over: all but the group
        axis of grouped heads (q has G there, k and v 1)."""
        return q.ndim - 2 - self.group_ndim if self.partition else 0

    @property
    def group_ndim(self) -> int:
        """The group axis of grouped heads (1), kept whole before the sequence."""
        return int(self.spec.kv_groups > 1)

    def over_sequence(self, forward: bool):
        """`per_shard`'s `over_sequence` for the forward or backward pass, or None when
        the sequence is gathered (with first keys, grouped heads or an array bias
        unless the pieces take them)."""
        spec = self.spec
        pieces = self.sequence_pieces
        if (
            not self.partition
            or pieces is None
            or spec.seq_len % self.multiple
            or not ring.takes(pieces, spec)
        ):
            return None

        def make(layout):
            def run(*arrays):
                options = dict(spec=spec, layout=layout, pieces=pieces)
                if forward:  # (out, lse): per_shard keeps as many as the kernels return
                    q, k, v, *rest = arrays
                    first_key, bias = rest[: spec.bounded], rest[spec.bounded :]
                    return ring.balanced_forward(q, k, v, *first_key, bias=bias, **options)
                q, k, v, d_out, *rest = arrays
                first_key, rest = rest[: spec.bounded], rest[spec.bounded :]
                bias, (out, *lse) = rest[: spec.array_bias], rest[spec.array_bias :]
                lse = lse[0] if lse else jnp.zeros_like(out[..., 0], dtype=jnp.float32)
                return ring.balanced_backward(
                    q, k, v, out, lse, d_out, *first_key, bias=bias, **options
                )

            return run

        return make


def row_attention(kernels: RowKernels, q, k, v, first_key=None, bias=None, rope=None):
    """Differentiable attention of `(*batch, S, D)` inputs through `kernels`, each pass
    one op per device's shard of the leading axes (`per_shard`); `first_key` (bounded
    specs) broadcasts against k's batch axes; `bias` (`spec.array_bias`: the kernels
    then take `bias=` rows and return its gradient) against q's, differentiable.

    With `rope` (`(sin, cos)`, `(..., S, D/2)` each, of q's rank, broadcasting against
    it with the axes where the angles vary first), q and k are the raw queries and
    keys: swish (as `spec.pre_activation` says) and RoPE are applied here, and the
    kernels' backward takes `prepared=` and returns the raw rows' gradients itself."""
    first = () if first_key is None else (jnp.broadcast_to(first_key, k.shape[:-1]),)
    biases = () if bias is None else (jnp.broadcast_to(bias, q.shape[:-2]).astype(jnp.float32),)
    if rope is None:
        return _row_attention(q, k, v, first, biases, kernels)
    return _raw_row_attention(q, k, v, first, biases, tuple(rope), kernels)


def _at_positions(biases: tuple, seq_len: int) -> tuple:
    """The array bias of each row `(*batch,)` at each of its positions, `(*batch, S)`:
    how it crosses `per_shard`, whose sequence axis may be sharded."""
    return tuple(jnp.broadcast_to(b[..., None], (*b.shape, seq_len)) for b in biases)


def bias_rows(biases: tuple, padded: int) -> dict:
    """The kernels' `bias=` keyword from a bias at positions `(*batch, S)`: `(N, S')`
    float32, edge-padded; empty without one."""
    if not biases:
        return {}
    rows = biases[0].reshape(-1, biases[0].shape[-1])
    return {"bias": jnp.pad(rows, ((0, 0), (0, padded - rows.shape[1])), mode="edge")}


def first_key_rows(first_key: tuple, padded: int) -> tuple:
    """`first_key` `(*batch, S)` as the kernels take it: `(N_kv, S')`, edge-padded
    (so it stays non-decreasing and padded rows see a key)."""
    if not first_key:
        return ()
    seq_len = first_key[0].shape[-1]
    rows = first_key[0].reshape(-1, seq_len).astype(jnp.int32)
    return (jnp.pad(rows, ((0, 0), (0, padded - seq_len)), mode="edge"),)


def _forward_outputs(kernels: RowKernels, q, k, v, first_key, biases):
    spec, multiple = kernels.spec, kernels.multiple
    n_first = len(first_key)

    def fn(q, k, v, *rest):
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, multiple) for x in (q, k, v)]
        padded = rows[0].shape[1]
        bias = bias_rows(rest[n_first:], padded)
        outs = kernels.forward(*rows, *first_key_rows(rest[:n_first], padded), **bias)
        return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)  # rows kept padded

    over_sequence = kernels.over_sequence(True)
    return per_shard(
        fn,
        q,
        k,
        v,
        *first_key,
        *_at_positions(biases, q.shape[-2]),
        batch_ndim=kernels.batch_ndim(q),
        over_sequence=over_sequence,
        group_ndim=kernels.group_ndim,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _row_attention(q, k, v, first_key, biases, kernels):
    outs = _forward_outputs(kernels, q, k, v, first_key, biases)
    return outs[0][..., : kernels.spec.seq_len, :]


def _row_attention_fwd(q, k, v, first_key, biases, kernels):
    if kernels.backward is None:
        raise ValueError(kernels.no_backward)
    outs = _forward_outputs(kernels, q, k, v, first_key, biases)
    return outs[0][..., : kernels.spec.seq_len, :], (q, k, v, first_key, biases, outs)


def _row_attention_bwd(kernels, residuals, d_out):
    q, k, v, first_key, biases, outs = residuals
    return _backward(kernels, q, k, v, d_out, first_key, biases, outs)


def _backward(kernels, q, k, v, d_out, first_key, biases, outs, raw=()):
    """The cotangents of `_row_attention`'s inputs; with `raw` (`(q, k, table)`, the
    raw rows and `rope_pair_table`), q and k are prepared, and the q and k cotangents
    are the raw rows'."""
    spec, multiple = kernels.spec, kernels.multiple
    n_first, n_bias, n_outs = len(first_key), len(biases), len(outs)
    swish = spec.pre_activation != "none"

    def fn(q, k, v, d_out, *rest):
        first_key, biases = rest[:n_first], rest[n_first : n_first + n_bias]
        outs = rest[n_first + n_bias : n_first + n_bias + n_outs]
        raw = rest[n_first + n_bias + n_outs :]
        batch = q.shape[:-2]
        rows = [as_rows(x, spec, multiple) for x in (q, k, v, d_out)]
        outs = [o.reshape(-1, *o.shape[len(batch) :]) for o in outs]
        padded = rows[0].shape[1]
        first = first_key_rows(first_key, padded)
        options = {"first_key": first} if first else {}
        options |= bias_rows(biases, padded)
        if raw:
            raw_q, raw_k = (as_rows(x, spec, multiple) for x in raw[:2])
            table = raw[2].reshape(-1, *raw[2].shape[-2:])  # rows of this shard's angles
            table = jnp.pad(table, ((0, 0), (0, padded - table.shape[1]), (0, 0)))
            options["prepared"] = Prepared(raw_q, raw_k, table, swish)
        grads = kernels.backward(*rows[:3], *outs, rows[3], **options)
        grads_qkv = tuple(
            from_rows(g, x.shape[:-2], spec).astype(x.dtype) for g, x in zip(grads, (q, k, v))
        )
        # The bias's gradient at each real position (summed over them after the op).
        d_biases = tuple(g[:, : spec.seq_len].reshape(*batch, spec.seq_len) for g in grads[3:])
        return grads_qkv + d_biases

    over_sequence = kernels.over_sequence(False)
    if raw and over_sequence is not None:
        over_sequence = _raw_after(over_sequence, n_first + n_bias + n_outs, swish)
    grads = per_shard(
        fn,
        q,
        k,
        v,
        d_out,
        *first_key,
        *_at_positions(biases, q.shape[-2]),
        *outs,
        *raw,
        batch_ndim=kernels.batch_ndim(q),
        over_sequence=over_sequence,
        group_ndim=kernels.group_ndim,
        shared=int(bool(raw)),
    )
    d_biases = tuple(g.sum(axis=-1) for g in grads[3:])
    return (*grads[:3], tuple(None for _ in first_key), d_biases)


def _raw_after(over_sequence, n_rest, swish):
    """`over_sequence` for a backward with raw rows: the ring's gradients w.r.t. the
    prepared q and k, then swish and RoPE's transpose on this device's shard (in XLA)."""

    def make(layout):
        ring_backward = over_sequence(layout)

        def run(q, k, v, d_out, *rest):
            rest, (raw_q, raw_k, table) = rest[:n_rest], rest[n_rest:]
            dq, dk, *others = ring_backward(q, k, v, d_out, *rest)
            dq, dk = (
                raw_gradient(g.astype(jnp.float32), x, table, swish)
                for g, x in ((dq, raw_q), (dk, raw_k))
            )
            return (dq, dk, *others)

        return run

    return make


_row_attention.defvjp(_row_attention_fwd, _row_attention_bwd)


def _prepare(q, k, rope, kernels: RowKernels):
    """Swish (unless `spec.pre_activation` is "none") and RoPE (`rope`: sin, cos) on q
    and k, in `spec.dtype`: through `prepare_pass.prepared` where `prepare_pass.serves`
    them."""
    spec = kernels.spec
    q, k = (x.astype(spec.dtype) for x in (q, k))
    if not (kernels.partition and prepare_pass.serves(spec, q.shape, rope[0].shape)):
        return tuple(
            maths.prepare(x, spec.pre_activation, *rope, spec.accum_dtype).astype(spec.dtype)
            for x in (q, k)
        )
    options = dict(batch_ndim=kernels.batch_ndim(q), group_ndim=kernels.group_ndim)
    return tuple(prepare_pass.prepared(x, spec.pre_activation, *rope, **options) for x in (q, k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _raw_row_attention(q, k, v, first_key, biases, rope, kernels):
    q, k = _prepare(q, k, rope, kernels)
    return _row_attention(q, k, v, first_key, biases, kernels)


def _raw_row_attention_fwd(q, k, v, first_key, biases, rope, kernels):
    prepared = _prepare(q, k, rope, kernels)
    out, (*_, outs) = _row_attention_fwd(*prepared, v, first_key, biases, kernels)
    return out, (q, k, *prepared, v, first_key, biases, rope_pair_table(*rope), outs)


def _raw_row_attention_bwd(kernels, residuals, d_out):
    q, k, q_prepared, k_prepared, v, first_key, biases, table, outs = residuals
    grads = _backward(
        kernels, q_prepared, k_prepared, v, d_out, first_key, biases, outs, raw=(q, k, table)
    )
    return (*grads, (None, None))  # the RoPE tables are constants


_raw_row_attention.defvjp(_raw_row_attention_fwd, _raw_row_attention_bwd)
