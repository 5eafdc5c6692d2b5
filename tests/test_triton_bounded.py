"""The Triton kernels with segments, sliding windows and grouped-query heads (Pallas
interpret mode here): the tiles they visit, and their outputs and gradients against the
reference with the mask written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import HALF_KERNEL, assert_all_close, spec

import eqx_xlstm as ex
from eqx_xlstm import maths
from eqx_xlstm.implementations import Reference, Triton
from eqx_xlstm.implementations.cudnn import CuDNNPieces
from eqx_xlstm.implementations.ring import BlockwisePieces
from eqx_xlstm.implementations.triton import kernels

SEQ = 77  # not a multiple of the blocks: padded rows and keys
# On a GPU, Triton multiplies float32 in TF32 (10-bit mantissas, as XLA's float32 dots
# there do by default): the kernels are compared at the 16-bit kernels' tolerance.
# Interpreted on a CPU they keep float32's. Through `attention`, Triton takes 16-bit
# inputs only on a GPU: those tests give it bfloat16 there.
ON_GPU = jax.default_backend() == "gpu"
COMPARED_AS = jnp.bfloat16 if ON_GPU else jnp.float32


def assert_close(got, want, err_msg="", **float32_tolerance):
    """`got` within `float32_tolerance` of `want`; on a GPU, within HALF_KERNEL's."""
    want = np.asarray(want)
    if ON_GPU:
        scale = max(1.0, float(np.abs(want).max()))
        float32_tolerance = dict(atol=HALF_KERNEL["atol"] * scale, rtol=HALF_KERNEL["rtol"])
    np.testing.assert_allclose(np.asarray(got), want, err_msg=err_msg, **float32_tolerance)


IDS = np.repeat(np.arange(4), [20, 9, 33, 15])
# Unequal query and key blocks, several of each.
TRITON = Triton(forward=(16, 32, 4, 1), backward=(32, 16, 4, 1))


def visibility(first_key, padded, causal=True):
    """The kernels' rule over the padded rows: causal (or not: a full piece), from each
    row's first key, real keys only; `(padded, padded)` bool."""
    i, j = np.arange(padded)[:, None], np.arange(padded)[None, :]
    return ((j <= i) | (not causal)) & (j >= first_key[:, None]) & (j < SEQ)


def padded_first_keys(window, segmented, padded):
    first = np.asarray(maths.first_keys(SEQ, window, jnp.asarray(IDS) if segmented else None))
    return np.pad(first, (0, padded - SEQ), mode="edge")


def piece_first_keys(window, segmented, padded):
    """First keys of a full piece of context-parallel attention: the whole-sequence
    ones shifted back by 40 keys, so that the first rows see every key, the last see
    none (first key SEQ, clipped) and the rows between some."""
    first = padded_first_keys(window, segmented, padded)
    return np.clip(first + 40, 0, SEQ).astype(np.int32)


@pytest.mark.parametrize(
    "window, segmented, causal",
    [(10, False, True), (None, True, True), (21, True, True)]
    + [(21, True, False), (None, True, False)],
)
def test_kernels_visit_exactly_the_tiles_some_query_sees(window, segmented, causal):
    """Forward/dq: each query block's key-block ranges; dk/dv: each key block's
    query-block ranges. A tile is visited iff one of its pairs is visible, and left
    unmasked only if all are. Causal, and full pieces of context-parallel attention."""
    bq, bk = 16, 32
    padded = 96
    if causal:
        bounded = spec(seq_len=SEQ, window=window, segmented=segmented)
    else:  # a full piece takes first keys, but its spec no segments or window
        bounded = spec(seq_len=SEQ, mask="full")
    if causal:
        first = padded_first_keys(window, segmented, padded)
    else:
        first = piece_first_keys(window, segmented, padded)
    seen = visibility(first, padded, causal)
    tile = lambda i, j, b_q, b_k: seen[i * b_q : (i + 1) * b_q, j * b_k : (j + 1) * b_k]

    for i in range(padded // bq):
        visited, unmasked = set(), set()
        for start, stop, masked in kernels._key_ranges(
            i, bq, bk, bounded, first[i * bq : (i + 1) * bq]
        ):
            blocks = set(range(int(start), int(stop)))
            assert not blocks & visited, f"query block {i} visits a key block twice"
            visited |= blocks
            unmasked |= set() if masked else blocks
        assert visited == {j for j in range(padded // bk) if tile(i, j, bq, bk).any()}, i
        assert all(tile(i, j, bq, bk).all() for j in unmasked), i

    ranges = kernels.key_block_ranges(jnp.asarray(first)[None], SEQ, bq, bk, causal)
    for j, (a, b, stop, start) in enumerate(np.asarray(ranges)[0]):
        assert start == ((j * bk) // bq if causal else 0)
        assert start <= a <= b <= stop
        visited = set(range(start, stop))
        assert visited == {i for i in range(padded // bq) if tile(i, j, bq, bk).any()}, j
        assert all(tile(i, j, bq, bk).all() for i in range(a, b)), j


def explicit_mask(window, segmented):
    i, j = np.arange(SEQ)[:, None], np.arange(SEQ)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    if segmented:
        mask &= IDS[:, None] == IDS[None, :]
    return jnp.asarray(mask)


@pytest.mark.parametrize(
    "activation, window, segmented, groups",
    [("softmax", 21, True, 2), ("sigmoid", None, True, 4), ("none", 10, False, 1)],
)
def test_kernels_equal_the_reference_with_the_mask_written_out(
    activation, window, segmented, groups
):
    """Outputs and gradients; grouped heads against the reference on repeated K/V
    heads, whose key/value gradients are summed over each group."""
    batch, kv_heads, dim = 2, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, kv_heads, groups, SEQ, dim))
    k, v = (jax.random.normal(key, (batch, kv_heads, 1, SEQ, dim)) for key in keys[1:3])
    g = jax.random.normal(keys[3], q.shape)
    base = spec(
        activation=activation,
        mask="explicit",
        batch_shape=q.shape[:-2],
        seq_len=SEQ,
        dqk=dim,
        dv=dim,
        sigmoid_bias=-1.5,
    )
    bounded = base.replace(mask="causal", window=window, segmented=segmented, kv_groups=groups)
    first_key = maths.first_keys(SEQ, window, jnp.asarray(IDS) if segmented else None)

    def out_and_grads(f, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return [out, *vjp(g)]

    repeated = [jnp.broadcast_to(x, q.shape) for x in (k, v)]
    mask = explicit_mask(window, segmented)
    expected = out_and_grads(lambda q, k, v: Reference()(q, k, v, base, mask), *repeated)
    expected[2:] = [x.sum(axis=2, keepdims=True) for x in expected[2:]]
    got = out_and_grads(lambda q, k, v: TRITON(q, k, v, bounded, None, first_key), k, v)
    assert_all_close([np.asarray(x) for x in got], [np.asarray(x) for x in expected], COMPARED_AS)


def test_packed_documents_through_the_public_call_equal_each_document_alone():
    """`attention(..., segment_ids=, implementation=Triton)` with grouped heads: each
    document equals that document alone (RoPE positions restart)."""
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (1, 4, SEQ, 16), COMPARED_AS)
    k, v = (jax.random.normal(key, (1, 2, SEQ, 16), COMPARED_AS) for key in keys[1:])
    kwargs = dict(
        activation_function="sigmoid", qk_pre_activation_function="swish", sigmoid_bias=-1.0
    )
    packed = ex.attention(q, k, v, segment_ids=IDS, implementation=TRITON, **kwargs)
    starts = np.flatnonzero(np.concatenate([[1], IDS[1:] != IDS[:-1]]))
    for start, stop in zip(starts, [*starts[1:], SEQ]):
        alone = ex.attention(*(x[..., start:stop, :] for x in (q, k, v)), **kwargs)
        f32 = lambda x: np.asarray(x.astype(jnp.float32))
        assert_close(f32(packed[..., start:stop, :]), f32(alone), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kv_heads, features", [(4, {}), (2, {"segment_ids": IDS[:45]})])
def test_a_learnable_sigmoid_bias_per_head_is_read_per_row_with_its_gradient(kv_heads, features):
    """The array bias goes into the kernels as each row's bias (not as a feature
    column), and its gradient comes back from the dq kernel."""
    keys = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(keys[0], (2, 4, 45, 16), COMPARED_AS)
    k, v = (jax.random.normal(key, (2, kv_heads, 45, 16), COMPARED_AS) for key in keys[1:3])
    bias = jax.random.normal(keys[3], (4,)) - 2.0
    g = jax.random.normal(keys[4], q.shape, COMPARED_AS)

    def out_and_grads(implementation, q, k, v, g):
        def f(q, k, v, bias):
            return ex.attention(
                q,
                k,
                v,
                activation_function="sigmoid",
                sigmoid_bias=bias,
                implementation=implementation,
                **features,
            )

        out, vjp = jax.vjp(f, q, k, v, bias)
        return [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(g))]

    assert TRITON.takes_bias
    got = out_and_grads(TRITON, q, k, v, g)
    expected = out_and_grads("reference", *(x.astype(jnp.float32) for x in (q, k, v, g)))
    assert_all_close(got[:4], expected[:4], COMPARED_AS)
    assert_close(got[4], expected[4], rtol=1e-4, atol=1e-5, err_msg="d bias")


@pytest.mark.parametrize(
    "activation, mask, pieces",
    [(a, m, "triton") for a in ("softmax", "sigmoid", "none") for m in ("causal", "full")]
    + [("softmax", m, "cudnn") for m in ("causal", "full")],
)
def test_ring_pieces_with_first_keys_match_the_blockwise_pieces(activation, mask, pieces):
    """A piece of context-parallel attention with first keys relative to its keys:
    causal (a chunk against itself) or full (against an earlier chunk, where some rows
    see every key, some part and the last none); output, log-sum-exp and gradients
    against the XLA pieces. cuDNN's pieces hand such pieces to the Triton pieces
    (cuDNN's window cannot start elsewhere than the diagonal), so no cuDNN call runs."""
    length = SEQ
    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v, g = (jax.random.normal(key, (2, 2, length, 16), COMPARED_AS) for key in keys)
    first = padded_first_keys(21, True, length)
    if mask == "full":
        first = piece_first_keys(21, True, length)
    first = jnp.broadcast_to(jnp.asarray(first), (2, 2, length))
    piece = spec(
        activation=activation,
        mask=mask,
        batch_shape=(2, 2),
        seq_len=length,
        dqk=16,
        dv=16,
        sigmoid_bias=-1.5,
        dtype=COMPARED_AS,
    )
    blockwise, kernels_ = BlockwisePieces(16), TRITON.ring_pieces()
    if pieces == "cudnn":
        kernels_ = CuDNNPieces(triton_pieces=kernels_)
    want, want_lse = blockwise.forward(q, k, v, piece, first)
    got, got_lse = kernels_.forward(q, k, v, piece, first)
    seen = True  # sigmoid and 'none' pieces return zeros for lse
    if activation == "softmax":  # rows that see no key: +inf there, -inf here; output 0
        seen = np.isfinite(np.asarray(want_lse))
        assert seen.all() if mask == "causal" else (seen.any() and not seen.all())
        np.testing.assert_array_equal(np.isfinite(np.asarray(got_lse)), seen)
        lse_of = lambda x: np.where(seen, x, 0.0)
        assert_close(lse_of(got_lse), lse_of(want_lse), rtol=2e-5, atol=2e-5, err_msg="lse")
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    assert_close(f32(got), f32(want), rtol=2e-5, atol=2e-5, err_msg="out")
    lse = jnp.where(seen, want_lse, 0.0)
    grads = [p.backward(q, k, v, want, lse, g, piece, first) for p in (blockwise, kernels_)]
    for name, a, b in zip(("dq", "dk", "dv"), grads[1], grads[0], strict=True):
        assert_close(f32(a), f32(b), rtol=2e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_ring_pieces_read_grouped_heads_in_place(activation):
    """Grouped-query heads in a full piece with first keys: the same as the piece on
    K/V repeated for each query head, whose K/V gradients sum over the group."""
    length, groups = SEQ, 2
    keys = jax.random.split(jax.random.key(6), 4)
    q, g = (jax.random.normal(key, (2, groups, length, 16), COMPARED_AS) for key in keys[:2])
    k, v = (jax.random.normal(key, (2, 1, length, 16), COMPARED_AS) for key in keys[2:])
    first = jnp.broadcast_to(jnp.asarray(piece_first_keys(21, True, length)), (2, 1, length))
    piece = spec(
        activation=activation,
        mask="full",
        batch_shape=(2, groups),
        seq_len=length,
        dqk=16,
        dv=16,
        sigmoid_bias=-1.5,
        dtype=COMPARED_AS,
    )
    pieces = TRITON.ring_pieces()
    repeated = [jnp.broadcast_to(x, q.shape) for x in (k, v)]
    want, want_lse = pieces.forward(q, *repeated, piece, first)
    got, got_lse = pieces.forward(q, k, v, piece.replace(kv_groups=groups), first)
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    assert_close(f32(got), f32(want), rtol=2e-5, atol=2e-5, err_msg="out")
    np.testing.assert_array_equal(np.asarray(got_lse), np.asarray(want_lse))
    lse = jnp.where(jnp.isfinite(want_lse), want_lse, 0.0)
    want_grads = pieces.backward(q, *repeated, want, lse, g, piece, first)
    want_grads = [want_grads[0], *(x.sum(axis=1, keepdims=True) for x in want_grads[1:])]
    got_grads = pieces.backward(q, k, v, want, lse, g, piece.replace(kv_groups=groups), first)
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads, strict=True):
        assert a.shape == b.shape, name
        assert_close(f32(a), f32(b), rtol=2e-5, atol=1e-4, err_msg=name)
