"""Context parallelism: one causal attention whose sequence is split over the devices
of a mesh axis, computed exactly, with per-device memory that shrinks with the count.

Each device holds a shard of q, k and v. Softmax and sigmoid pass the k/v shards
around a ring (`lax.ppermute`): at each step a device attends its queries to the keys
it holds, while the next shard is already on its way. Softmax pieces merge through
their log-sum-exp; sigmoid and 'none' pieces simply add. The backward pass sends the
k/v shards round again, with their gradients travelling along, and ends with each
gradient back on its owner. 'none' with the causal mask needs no ring: each device
adds to its local linear attention the k^T v state of everything before it, an
exclusive prefix over devices of D x D sums (`linear_prefix`).

Segments and windows reach each piece as its queries' first keys relative to the key
chunk it meets; an array sigmoid bias as its queries' bias at each position, whose
gradient accumulates with dq. Grouped-query heads ride along in the pieces (k and v
keep their Hkv heads).

Causal work is balanced by the zig-zag layout: cutting the sequence into 2n chunks,
device d holds chunks d and 2n - 1 - d, so every device does the same work at every
ring step. `to_zigzag` and `from_zigzag` move contiguous shards into it and back (two
`ppermute`s per array).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..spec import AttentionSpec
from .base import SequenceLayout
from .blockwise import piece_backward, piece_forward
from .reference import matmul_precision


@dataclasses.dataclass(frozen=True)
class BlockwisePieces:
    """Ring pieces computed blockwise in XLA (any platform, any dtype)."""

    block: int = 512

    def forward(self, q, k, v, spec: AttentionSpec, first_key=None):
        """`(out, lse)` of a causal or full piece (`piece_forward`); `first_key`: each
        query's first visible key, relative to the piece's keys."""
        return piece_forward(q, k, v, spec, self.block, first_key)

    def backward(self, q, k, v, out, lse, d_out, spec: AttentionSpec, first_key=None):
        """`(dq, dk, dv)` of a piece, given the whole rows' out and lse."""
        return piece_backward(q, k, v, out, lse, d_out, spec, self.block, first_key)


def takes(pieces, spec: AttentionSpec) -> bool:
    """Whether ring `pieces` take what `spec` asks of them beyond plain pieces: each
    query's first key (segments, windows), grouped-query heads, an array sigmoid bias
    (each a `takes_...` attribute of the pieces; absent means no)."""
    wants = {
        "takes_first_keys": spec.bounded,
        "takes_grouped_heads": spec.kv_groups > 1,
        "takes_array_bias": spec.array_bias,
    }
    return all(getattr(pieces, name, False) for name, wanted in wants.items() if wanted)


def _split(x, parts: int, axis: int = -2):
    return jnp.split(x, parts, axis=axis) if parts > 1 else [x]


def _next_device(x, layout: SequenceLayout):
    n = layout.devices
    return lax.ppermute(x, layout.axis_name, [(i, (i + 1) % n) for i in range(n)])


def _empty_piece(q, v, accum):
    """The partial result of rows that see none of the keys."""
    rows = jnp.zeros_like(q[..., 0], dtype=accum)  # `_like`: varies as q does
    return jnp.broadcast_to(rows[..., None], (*rows.shape, v.shape[-1])), rows - jnp.inf


def _merge(acc, piece, softmax: bool):
    """Combine two partial results `(out, lse)` of the same rows; lse -inf = empty."""
    (o1, l1), (o2, l2) = acc, piece
    if not softmax:
        return o1 + o2, l1
    top = jnp.maximum(l1, l2)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    w1, w2 = jnp.exp2(l1 - safe), jnp.exp2(l2 - safe)
    total = w1 + w2
    norm = jnp.where(total > 0, total, 1.0)
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / norm[..., None]
    return out, jnp.where(total > 0, safe + jnp.log2(norm), -jnp.inf)


def _pieces(spec: AttentionSpec, layout: SequenceLayout, shard_len: int):
    """The specs of a causal piece (a chunk against itself) and a full one (windows
    and segments reach the pieces as first keys)."""
    piece = spec.replace(seq_len=shard_len // layout.chunks, window=None, segmented=False)
    return piece.replace(mask="causal"), piece.replace(mask="full")


def ring_attention(q, k, v, spec: AttentionSpec, layout: SequenceLayout, pieces, first_key=None):
    """Causal attention of the whole sequence for this device's shard `(*batch, L, D)`
    (queries and keys through swish and RoPE); call inside `shard_map` (or a
    custom-partitioned op) over `layout.axis_name`; `pieces` computes each piece
    (`BlockwisePieces`, or kernels); `first_key` (segments, windows): each query's
    first visible key, global positions, `(*batch, L)` like q. Returns
    `spec.accum_dtype`."""
    return _ring(q, k, v, first_key, spec, layout, pieces)[0]


def _around(layout: SequenceLayout, held, carry, visit):
    """`carry = visit(step, held, carry)` for ring steps 1 .. n-1, `held` being the
    k/v shards of the device `step` places back; each step's transfer of the next
    shards is issued before its work, so that the two overlap. One loop body, so
    temporaries are those of one step whatever the device count."""
    n = layout.devices
    if n == 1:
        return carry
    held = _next_device(held, layout)

    def body(step, state):
        held, carry = state
        coming = _next_device(held, layout)
        return coming, visit(step, held, carry)

    held, carry = lax.fori_loop(1, n - 1, body, (held, carry))
    return visit(n - 1, held, carry)


def _in_chunks(x, chunks: int, axis: int = -2):
    """The sequence `axis` of `x` cut into `chunks`: a new axis before it."""
    axis %= x.ndim
    return x.reshape(*x.shape[:axis], chunks, x.shape[axis] // chunks, *x.shape[axis + 1 :])


def _chunk(x, index, axis: int = -3):
    return lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


def _set_chunk(x, value, index, axis: int = -3):
    return lax.dynamic_update_index_in_dim(x, value, index, axis)


CAUSAL, FULL, EMPTY = 0, 1, 2


def _in(dtype, arrays):
    return tuple(x.astype(dtype) for x in arrays)


def _kind(layout: SequenceLayout, step, a, b):
    """How query chunk a here meets key chunk b of the device `step` places back:
    CAUSAL (the same chunk), FULL (an earlier chunk) or EMPTY (a later one)."""
    device = lax.axis_index(layout.axis_name)
    source = (device - step) % layout.devices
    mine, theirs = layout.global_chunk(device, a), layout.global_chunk(source, b)
    return jnp.where(theirs == mine, CAUSAL, jnp.where(theirs < mine, FULL, EMPTY))


def _relative_first_keys(first_keys, layout: SequenceLayout, step, a, b, size):
    """`()`, or the first keys of query chunk a (global positions) relative to key
    chunk b of the device `step` places back, clipped to `[0, size]` (size: the row
    sees none of these keys)."""
    if first_keys is None:
        return ()
    device = lax.axis_index(layout.axis_name)
    source = (device - step) % layout.devices
    start = layout.global_chunk(source, b) * size
    return (jnp.clip(_chunk(first_keys, a, -2) - start, 0, size),)


def _piece_options(extras, with_first: bool) -> dict:
    """The pieces' keyword arguments from a piece's operands after its arrays: the
    relative first keys (`with_first`), then the query chunk's bias, if any."""
    options = {"first_key": extras[0]} if with_first else {}
    if len(extras) > with_first:
        options["bias"] = extras[with_first]
    return options


def _each_pair(layout: SequenceLayout, step, carry, piece):
    """`carry = piece(kind, a, b, carry)` for each (query chunk a, key chunk b), one
    after another (one piece's temporaries at a time)."""
    chunks = layout.chunks

    def body(pair, carry):
        a, b = pair // chunks, pair % chunks
        return piece(_kind(layout, step, a, b), a, b, carry)

    return lax.fori_loop(0, chunks * chunks, body, carry)


def _forward(q, k, v, spec, layout, pieces, first_key=None, bias=None):
    """`first_key`: each query's first visible key (global positions, sharded like q;
    segments, windows), or None; `bias`: each query's sigmoid bias `(*batch, L)`
    (`spec.array_bias`, pieces that take `bias=`), or None."""
    accum, softmax = spec.accum_dtype, spec.activation == "softmax"
    causal, full = _pieces(spec, layout, q.shape[-2])
    chunks = layout.chunks
    size = q.shape[-2] // chunks
    qs = _in_chunks(q, chunks)
    fks = None if first_key is None else _in_chunks(first_key, chunks, -1)
    biases = None if bias is None else _in_chunks(bias, chunks, -1)
    empty = lambda q_a, k_b, v_b, *_: _empty_piece(q_a, v_b, accum)
    with_first = first_key is not None
    run = lambda piece_spec: (
        lambda q, k, v, *extras: _in(
            accum, pieces.forward(q, k, v, piece_spec, **_piece_options(extras, with_first))
        )
    )
    branches = [run(causal), run(full), empty]

    def visit(step, held, acc):
        ks, vs = (_in_chunks(x, chunks) for x in held)

        def piece(kind, a, b, acc):
            outs, lses = acc
            first = _relative_first_keys(fks, layout, step, a, b, size)
            bias_a = () if biases is None else (_chunk(biases, a, -2),)
            chunk_b = (_chunk(ks, b), _chunk(vs, b))
            out, lse = lax.switch(kind, branches, _chunk(qs, a), *chunk_b, *first, *bias_a)
            if softmax:  # piece_forward marks empty rows +inf; merging wants -inf
                lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)
            out, lse = _merge((_chunk(outs, a), _chunk(lses, a, -2)), (out, lse), softmax)
            return _set_chunk(outs, out, a), _set_chunk(lses, lse, a, -2)

        return _each_pair(layout, step, acc, piece)

    out0, lse0 = empty(q, k, v)
    acc = (_in_chunks(out0, chunks), _in_chunks(lse0, chunks, -1))
    acc = visit(0, (k, v), acc)
    outs, lses = _around(layout, (k, v), acc, visit)
    out, lse = outs.reshape(out0.shape), lses.reshape(lse0.shape)
    return out, jnp.where(lse == -jnp.inf, jnp.inf, lse)


def _backward(q, k, v, out, lse, d_out, spec, layout, pieces, first_key=None, bias=None):
    """`(dq, dk, dv)`, and with `bias` (as `_forward` takes it) its gradient at each
    position, `(*batch, L)`."""
    causal, full = _pieces(spec, layout, q.shape[-2])
    chunks = layout.chunks
    size = q.shape[-2] // chunks
    fks = None if first_key is None else _in_chunks(first_key, chunks, -1)
    biases = None if bias is None else _in_chunks(bias, chunks, -1)
    qs, outs, d_outs = (_in_chunks(x, chunks) for x in (q, out, d_out))
    lses = _in_chunks(lse, chunks, -1)
    accum = spec.accum_dtype
    zeros_of = lambda x: jnp.zeros_like(x, dtype=accum)
    with_first = first_key is not None

    def zeros(q_a, k_b, v_b, *xs):
        grads = tuple(map(zeros_of, (q_a, k_b, v_b)))
        return grads if bias is None else (*grads, zeros_of(xs[-1]))  # the bias chunk

    run = lambda piece_spec: (
        lambda *xs: _in(
            accum, pieces.backward(*xs[:6], piece_spec, **_piece_options(xs[6:], with_first))
        )
    )
    branches = [run(causal), run(full), zeros]

    def visit(step, held, carry):
        """Add this step's dq (and bias gradient); send on the held shards' dk, dv
        with the sums that came with them (the last send takes them home)."""
        travelling, own = carry
        ks, vs = (_in_chunks(x, chunks) for x in held)

        def piece(kind, a, b, grads):
            dks, dvs, *own = grads
            rows = (_chunk(qs, a), _chunk(ks, b), _chunk(vs, b), _chunk(outs, a))
            first = _relative_first_keys(fks, layout, step, a, b, size)
            bias_a = () if biases is None else (_chunk(biases, a, -2),)
            dq, dk, dv, *d_bias = lax.switch(
                kind, branches, *rows, _chunk(lses, a, -2), _chunk(d_outs, a), *first, *bias_a
            )
            own = [
                _set_chunk(x, _chunk(x, a, axis) + g, a, axis)
                for x, g, axis in zip(own, (dq, *d_bias), (-3, -2))
            ]
            return (
                _set_chunk(dks, _chunk(dks, b) + dk, b),
                _set_chunk(dvs, _chunk(dvs, b) + dv, b),
                *own,
            )

        dks, dvs, *own = _each_pair(layout, step, (*travelling, *own), piece)
        return _next_device((dks, dvs), layout), tuple(own)

    dkv = (zeros_of(_in_chunks(k, chunks)), zeros_of(_in_chunks(v, chunks)))
    own = (zeros_of(qs),) + (() if biases is None else (zeros_of(biases),))
    carry = visit(0, (k, v), (dkv, own))
    (dks, dvs), own = _around(layout, (k, v), carry, visit)
    grads = (own[0].reshape(q.shape), dks.reshape(k.shape), dvs.reshape(v.shape))
    return grads if bias is None else (*grads, own[1].reshape(bias.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring(q, k, v, first_key, spec, layout, pieces):
    return _forward(q, k, v, spec, layout, pieces, first_key)


def _ring_fwd(q, k, v, first_key, spec, layout, pieces):
    out, lse = _forward(q, k, v, spec, layout, pieces, first_key)
    return (out, lse), (q, k, v, first_key, out, lse)


def _ring_bwd(spec, layout, pieces, residuals, cotangents):
    q, k, v, first_key, out, lse = residuals
    d_out = cotangents[0].astype(out.dtype)
    dq, dk, dv = _backward(q, k, v, out, lse, d_out, spec, layout, pieces, first_key)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def linear_prefix(q, k, v, spec: AttentionSpec, layout: SequenceLayout, local):
    """Causal 'none' attention of the whole sequence for this device's shard: each
    chunk's local linear attention plus its queries against the k^T v state of every
    earlier chunk (an all-reduce of one D x DV state per chunk and device; no ring).
    `local(q, k, v, spec)` is causal 'none' attention of one chunk."""
    device = lax.axis_index(layout.axis_name)
    chunks = layout.chunks
    size = q.shape[-2] // chunks
    piece = spec.replace(seq_len=size)
    einsum = functools.partial(
        jnp.einsum,
        precision=matmul_precision(spec.dtype),
        preferred_element_type=spec.accum_dtype,
    )
    qs, ks, vs = (_split(x, chunks) for x in (q, k, v))
    states = jnp.stack([einsum("...kd,...kv->...dv", k_c, v_c) for k_c, v_c in zip(ks, vs)])
    # Every device's states, (devices, chunks, *batch, D, DV): each put in its place and
    # summed (one all-reduce; an all-gather of them loses its sharding type under
    # jax.vmap in JAX's explicit sharding mode).
    mine = (jnp.arange(layout.devices) == device).reshape(-1, *[1] * states.ndim)
    every = lax.psum(jnp.where(mine, states[None], 0.0), layout.axis_name)
    owners = jnp.arange(layout.devices)
    outs = []
    for a in range(chunks):
        position = layout.global_chunk(device, a)
        earlier = jnp.stack(
            [layout.global_chunk(owners, j) < position for j in range(chunks)], axis=1
        )
        earlier = earlier.reshape(earlier.shape + (1,) * (every.ndim - 2))
        before = jnp.sum(jnp.where(earlier, every, 0.0), axis=(0, 1))
        local_out = local(qs[a], ks[a], vs[a], piece)
        carried = einsum("...qd,...dv->...qv", qs[a].astype(spec.accum_dtype), before)
        outs.append(local_out + carried * spec.scale)
    return jnp.concatenate(outs, axis=-2)


def _halves_moved(x, layout: SequenceLayout, to_zigzag: bool, axis: int):
    """Move the two halves of each device's shard between the contiguous and the
    zig-zag layout. Global chunk g of 2n sits on device g // 2 in slot g % 2 when
    contiguous, on device min(g, 2n - 1 - g) in slot g >= n when zig-zag. The even
    chunks move in one `ppermute` and the odd ones in another: within each, every
    device sends one half and receives one, in slots that depend on the device."""
    n = layout.devices
    contiguous = lambda g: (g // 2, g % 2)
    zigzag = lambda g: (min(g, 2 * n - 1 - g), int(g >= n))
    src, dst = (contiguous, zigzag) if to_zigzag else (zigzag, contiguous)
    me = lax.axis_index(layout.axis_name)
    halves = _split(x, 2, axis)
    received = [jnp.zeros_like(halves[0]), jnp.zeros_like(halves[1])]
    for parity in (0, 1):
        chunks = range(parity, 2 * n, 2)
        send_slot, land_slot = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for g in chunks:
            send_slot[src(g)[0]], land_slot[dst(g)[0]] = src(g)[1], dst(g)[1]
        sent = jnp.where(jnp.asarray(send_slot)[me] == 0, halves[0], halves[1])
        moved = lax.ppermute(sent, layout.axis_name, [(src(g)[0], dst(g)[0]) for g in chunks])
        lands = jnp.asarray(land_slot)[me]
        received = [jnp.where(lands == slot, moved, r) for slot, r in enumerate(received)]
    return jnp.concatenate(received, axis=axis)


def to_zigzag(x, layout: SequenceLayout, axis: int = -2):
    """This device's contiguous shard (the sequence on `axis`) -> its zig-zag shard."""
    return _halves_moved(x, layout, True, axis)


def from_zigzag(x, layout: SequenceLayout, axis: int = -2):
    """This device's zig-zag shard -> its contiguous shard."""
    return _halves_moved(x, layout, False, axis)


def balanced_layout(layout: SequenceLayout, shard_len: int) -> SequenceLayout:
    """The zig-zag layout of contiguous `layout`, if its shards split in two."""
    if layout.devices > 1 and shard_len % 2 == 0:
        return dataclasses.replace(layout, zigzag=True)
    return layout


def balanced_attention(
    q, k, v, spec: AttentionSpec, layout: SequenceLayout, pieces, first_key=None
):
    """`ring_attention` (differentiable) of contiguous shards, computed in the zig-zag
    layout; in `spec.dtype` (cast before the output moves back)."""
    zigzag = balanced_layout(layout, q.shape[-2])
    if zigzag is layout:
        return ring_attention(q, k, v, spec, layout, pieces, first_key).astype(spec.dtype)
    first = None if first_key is None else to_zigzag(first_key, zigzag, axis=-1)
    moved = [to_zigzag(x, zigzag) for x in (q, k, v)]
    out = ring_attention(*moved, spec, zigzag, pieces, first)
    return from_zigzag(out.astype(spec.dtype), zigzag)


def _per_position(arrays, zigzag: SequenceLayout | None):
    """The first of `arrays` (one per position, `(*batch, L)`; an empty sequence:
    None), moved into `zigzag` where given."""
    if not arrays:
        return None
    return arrays[0] if zigzag is None else to_zigzag(arrays[0], zigzag, axis=-1)


def balanced_forward(q, k, v, *first_key, spec, layout: SequenceLayout, pieces, bias=()):
    """`(out, lse)` of contiguous shards, computed in the zig-zag layout; `first_key`
    (optional): each query's first visible key, global positions, sharded like q;
    `bias` (optional, a sequence of one): each query's sigmoid bias, `(*batch, L)`."""
    zigzag = balanced_layout(layout, q.shape[-2])
    if zigzag is layout:
        first, own = _per_position(first_key, None), _per_position(bias, None)
        return _forward(q, k, v, spec, layout, pieces, first, own)
    first, own = _per_position(first_key, zigzag), _per_position(bias, zigzag)
    moved = [to_zigzag(x, zigzag) for x in (q, k, v)]
    out, lse = _forward(*moved, spec, zigzag, pieces, first, own)
    return from_zigzag(out, zigzag), from_zigzag(lse, zigzag, axis=-1)


def balanced_backward(
    q, k, v, out, lse, d_out, *first_key, spec, layout: SequenceLayout, pieces, bias=()
):
    """`(dq, dk, dv)` of contiguous shards, computed in the zig-zag layout; with
    `bias` (as `balanced_forward` takes it), its gradient at each position too."""
    zigzag = balanced_layout(layout, q.shape[-2])
    if zigzag is layout:
        first, own = _per_position(first_key, None), _per_position(bias, None)
        return _backward(q, k, v, out, lse, d_out, spec, layout, pieces, first, own)
    first, own = _per_position(first_key, zigzag), _per_position(bias, zigzag)
    moved = [to_zigzag(x, zigzag) for x in (q, k, v, out, d_out)]
    lse = to_zigzag(lse, zigzag, axis=-1)
    grads = _backward(*moved[:4], lse, moved[4], spec, zigzag, pieces, first, own)
    axes = (-2, -2, -2, -1)  # dq, dk, dv along their sequence; the bias's along its last
    return tuple(from_zigzag(g, zigzag, axis=axis) for g, axis in zip(grads, axes))
