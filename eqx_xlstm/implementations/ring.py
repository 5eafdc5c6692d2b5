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
    if acc is None:
        return piece
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
    """The specs of a causal piece (a chunk against itself) and a full one."""
    size = shard_len // layout.chunks
    return spec.replace(seq_len=size, mask="causal"), spec.replace(seq_len=size, mask="full")


def ring_attention(q, k, v, spec: AttentionSpec, layout: SequenceLayout, block: int):
    """Causal attention of the whole sequence for this device's shard `(*batch, L, D)`
    (queries and keys through swish and RoPE); call inside `shard_map` (or a
    custom-partitioned op) over `layout.axis_name`. Returns `spec.accum_dtype`."""
    return _ring(q, k, v, spec, layout, block)[0]


def _forward(q, k, v, spec, layout, block):
    accum, softmax = spec.accum_dtype, spec.activation == "softmax"
    device = lax.axis_index(layout.axis_name)
    causal, full = _pieces(spec, layout, q.shape[-2])
    qs = _split(q, layout.chunks)
    acc = [None] * layout.chunks
    held = (k, v)
    for step in range(layout.devices):
        if step + 1 < layout.devices:  # on its way while this step computes
            coming = _next_device(held, layout)
        ks, vs = _split(held[0], layout.chunks), _split(held[1], layout.chunks)
        source = (device - step) % layout.devices
        for a, q_a in enumerate(qs):
            for b, (k_b, v_b) in enumerate(zip(ks, vs)):
                if step == 0:  # own chunks, in global order: below or on the diagonal
                    if b > a:
                        continue
                    piece = piece_forward(q_a, k_b, v_b, causal if a == b else full, block)
                else:
                    sees = layout.global_chunk(source, b) < layout.global_chunk(device, a)
                    piece = lax.cond(
                        sees,
                        lambda *xs: piece_forward(*xs, full, block),
                        lambda q_a, k_b, v_b: _empty_piece(q_a, v_b, accum),
                        q_a,
                        k_b,
                        v_b,
                    )
                if softmax:  # piece_forward marks empty rows +inf; merging wants -inf
                    piece = (piece[0], jnp.where(piece[1] == jnp.inf, -jnp.inf, piece[1]))
                acc[a] = _merge(acc[a], piece, softmax)
        if step + 1 < layout.devices:
            held = coming
    out = jnp.concatenate([o for o, _ in acc], axis=-2)
    lse = jnp.concatenate([rows for _, rows in acc], axis=-1)
    return out, jnp.where(lse == -jnp.inf, jnp.inf, lse)


def _backward(q, k, v, out, lse, d_out, spec, layout, block):
    device = lax.axis_index(layout.axis_name)
    causal, full = _pieces(spec, layout, q.shape[-2])
    chunks = layout.chunks
    qs, outs, d_outs = (_split(x, chunks) for x in (q, out, d_out))
    lses = _split(lse, chunks, axis=-1)
    dqs = [jnp.zeros_like(x) for x in qs]
    held, travelling = (k, v), None
    for step in range(layout.devices):
        if step + 1 < layout.devices:
            coming = _next_device(held, layout)
        ks, vs = _split(held[0], chunks), _split(held[1], chunks)
        dks, dvs = [jnp.zeros_like(x) for x in ks], [jnp.zeros_like(x) for x in vs]
        source = (device - step) % layout.devices
        for a in range(chunks):
            for b in range(chunks):
                args = (qs[a], ks[b], vs[b], outs[a], lses[a], d_outs[a])
                if step == 0:
                    if b > a:
                        continue
                    grads = piece_backward(*args, causal if a == b else full, block)
                else:
                    sees = layout.global_chunk(source, b) < layout.global_chunk(device, a)
                    grads = lax.cond(
                        sees,
                        lambda *xs: piece_backward(*xs, full, block),
                        lambda q_a, k_b, v_b, *_: tuple(map(jnp.zeros_like, (q_a, k_b, v_b))),
                        *args,
                    )
                dqs[a] = dqs[a] + grads[0]
                dks[b], dvs[b] = dks[b] + grads[1], dvs[b] + grads[2]
        mine = (jnp.concatenate(dks, axis=-2), jnp.concatenate(dvs, axis=-2))
        if travelling is not None:  # the sums so far for this shard, from the last device
            mine = jax.tree.map(jnp.add, mine, travelling)
        travelling = _next_device(mine, layout)  # the last send takes them home
        if step + 1 < layout.devices:
            held = coming
    dk, dv = travelling
    return jnp.concatenate(dqs, axis=-2), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring(q, k, v, spec, layout, block):
    return _forward(q, k, v, spec, layout, block)


def _ring_fwd(q, k, v, spec, layout, block):
    out, lse = _forward(q, k, v, spec, layout, block)
    return (out, lse), (q, k, v, out, lse)


def _ring_bwd(spec, layout, block, residuals, cotangents):
    q, k, v, out, lse = residuals
    d_out = cotangents[0].astype(out.dtype)
    dq, dk, dv = _backward(q, k, v, out, lse, d_out, spec, layout, block)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_fwd, _ring_bwd)


def linear_prefix(q, k, v, spec: AttentionSpec, layout: SequenceLayout, local):
    """Causal 'none' attention of the whole sequence for this device's shard: each
    chunk's local linear attention plus its queries against the k^T v state of every
    earlier chunk (an all-gather of one D x DV state per chunk; no ring).
    `local(q, k, v, spec)` is causal 'none' attention of one chunk."""
    device = lax.axis_index(layout.axis_name)
    chunks = layout.chunks
    size = q.shape[-2] // chunks
    piece = spec.replace(seq_len=size)
    einsum = functools.partial(jnp.einsum, preferred_element_type=spec.accum_dtype)
    qs, ks, vs = (_split(x, chunks) for x in (q, k, v))
    states = jnp.stack([einsum("...kd,...kv->...dv", k_c, v_c) for k_c, v_c in zip(ks, vs)])
    every = lax.all_gather(states, layout.axis_name)  # (devices, chunks, *batch, D, DV)
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


def _balance(layout: SequenceLayout, shard_len: int) -> SequenceLayout:
    """The zig-zag layout of contiguous `layout`, if its shards split in two."""
    if layout.devices > 1 and shard_len % 2 == 0:
        return dataclasses.replace(layout, zigzag=True)
    return layout


def balanced_forward(q, k, v, *, spec, layout: SequenceLayout, block: int):
    """`(out, lse)` of contiguous shards, computed in the zig-zag layout."""
    zigzag = _balance(layout, q.shape[-2])
    if zigzag is layout:
        return _forward(q, k, v, spec, layout, block)
    out, lse = _forward(*(to_zigzag(x, zigzag) for x in (q, k, v)), spec, zigzag, block)
    return from_zigzag(out, zigzag), from_zigzag(lse, zigzag, axis=-1)


def balanced_backward(q, k, v, out, lse, d_out, *, spec, layout: SequenceLayout, block: int):
    """`(dq, dk, dv)` of contiguous shards, computed in the zig-zag layout."""
    zigzag = _balance(layout, q.shape[-2])
    if zigzag is layout:
        return _backward(q, k, v, out, lse, d_out, spec, layout, block)
    moved = [to_zigzag(x, zigzag) for x in (q, k, v, out, d_out)]
    lse = to_zigzag(lse, zigzag, axis=-1)
    grads = _backward(*moved[:4], lse, moved[4], spec, zigzag, block)
    return tuple(from_zigzag(g, zigzag) for g in grads)
