"""Packed sequences (`segment_ids`), sliding windows and grouped-query heads, on every
path that serves them, against the reference with an explicit mask, against each
packed document alone, and against repeated key/value heads."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ACTIVATIONS, F32_GRAD, F32_OUT, assert_all_close, out_and_grads, random_inputs

import eqx_xlstm as ex
from eqx_xlstm import maths
from eqx_xlstm.implementations import Chunked, Linear, Reference

SEQ = 29
IDS = np.array([0] * 7 + [3] * 11 + [1] * 3 + [1] * 0 + [5] * 8)  # runs of 7, 11, 3, 8
# XLA paths that serve each feature; small blocks and chunks so that several are visited.
PATHS = {"reference": Reference(), "chunked": Chunked(block=4), "linear": Linear(chunk=4)}


def serving(activation, window=False):
    names = ["reference", "chunked"]
    if activation == "none" and not window:
        names.append("linear")
    return names


def explicit_mask(seq_len, ids=None, window=None):
    """The visibility rule written out: causal, within the window, in the same run."""
    i, j = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    if ids is not None:
        run = np.cumsum(np.concatenate([[0], ids[1:] != ids[:-1]]))
        mask &= run[:, None] == run[None, :]
    return jnp.asarray(mask)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("window", [1, 5, SEQ + 3])
def test_sliding_window_equals_its_explicit_mask(activation, window):
    q, k, v, g = random_inputs(seq=SEQ, batch=(2,))
    kwargs = dict(activation_function=activation, sigmoid_bias=-2.0)
    expected = out_and_grads(
        q, k, v, g, explicit_mask(SEQ, window=window), implementation="reference", **kwargs
    )
    for name in serving(activation, window=True):
        got = out_and_grads(
            q, k, v, g, jit=True, sliding_window=window, implementation=PATHS[name], **kwargs
        )
        assert_all_close(got, expected, jnp.float32, f" {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("window", [4])  # segments alone: the packed-document test
def test_implementations_match_the_explicit_mask_of_segments_and_windows(activation, window):
    """The implementations given first keys (after RoPE, so positions do not enter)
    against the reference with the mask written out, grouped heads included."""
    q, _, _, g = random_inputs(seq=SEQ, batch=(2, 4))
    _, k, v, _ = random_inputs(seq=SEQ, batch=(2, 2), seed=1)
    grouped = lambda x: x.reshape(2, 2, 2, SEQ, x.shape[-1])
    base = dict(
        activation=activation,
        pre_activation="none",
        dtype=jnp.float32,
        seq_len=SEQ,
        dqk=8,
        dv=6,
        sigmoid_bias=-1.5,
    )
    masked = ex.AttentionSpec(mask="explicit", batch_shape=(2, 2, 2), **base)
    mask = explicit_mask(SEQ, IDS, window)
    bounded = masked.replace(mask="causal", segmented=True, window=window, kv_groups=2)
    first_key = maths.first_keys(SEQ, window, jnp.asarray(IDS))

    def run(impl, spec, mask, first_key):
        def f(q, k, v):
            return impl(grouped(q), k[:, :, None], v[:, :, None], spec, mask, first_key)

        @jax.jit
        def both(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: f(q, k, v).reshape(g.shape), q, k, v)
            return (out, *vjp(g))

        return [np.asarray(x) for x in both(q, k, v)]

    expected = run(Reference(), masked.replace(kv_groups=1), mask, None)
    for name in serving(activation, window is not None):
        impl = PATHS[name]
        assert impl.unsupported(bounded) is None
        got = run(impl, bounded, None, first_key)
        assert_all_close(got, expected, jnp.float32, f" {name}")


def _packed_and_alone(activation, ids, window, names):
    """Outputs and gradients of the packed batch on each path in `names`, and of each
    document alone (the reference path)."""
    batch, seq_len = ids.shape
    q, k, v, g = random_inputs(seq=seq_len, batch=(batch, 3))
    kwargs = dict(
        activation_function=activation,
        qk_pre_activation_function="swish",
        sigmoid_bias=-1.0,
        sliding_window=window,
    )
    ids_batched = jnp.asarray(ids)[:, None, :]
    packed = {
        name: out_and_grads(
            q, k, v, g, segment_ids=ids_batched, implementation=PATHS[name], **kwargs
        )
        for name in names
    }
    alone = [np.zeros_like(x) for x in packed[names[0]]]
    for b in range(batch):
        starts = np.flatnonzero(np.concatenate([[1], ids[b, 1:] != ids[b, :-1]]))
        for start, stop in zip(starts, [*starts[1:], seq_len]):
            piece = (x[b : b + 1, :, start:stop] for x in (q, k, v, g))
            for whole, part in zip(alone, out_and_grads(*piece, jit=True, **kwargs)):
                whole[b : b + 1, :, start:stop] = part
    return packed, alone


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("window", [None, 3])
def test_each_packed_document_equals_that_document_alone(activation, window):
    # Two packings of documents of 7, 11, 3 and 8 positions.
    ids = np.stack([IDS, np.repeat(np.arange(4), [11, 7, 8, 3])])
    names = serving(activation, window is not None)
    packed, alone = _packed_and_alone(activation, ids, window, names)
    for name in names:
        for label, a, b in zip(("out", "dq", "dk", "dv"), packed[name], alone):
            tol = F32_OUT if label == "out" else F32_GRAD
            np.testing.assert_allclose(a, b, **tol, err_msg=f"{label} {name}")


def test_one_segment_is_plain_causal_attention():
    q, k, v, g = random_inputs(seq=SEQ, batch=(2,))
    ids = jnp.full((SEQ,), 7)
    expected = out_and_grads(q, k, v, g, jit=True, activation_function="sigmoid")
    got = out_and_grads(q, k, v, g, jit=True, segment_ids=ids, activation_function="sigmoid")
    assert_all_close(got, expected, jnp.float32)


@pytest.mark.parametrize(
    "activation, kv_heads", [("softmax", 1), ("sigmoid", 2), ("none", 1), ("none", 2)]
)
def test_grouped_query_heads_equal_repeated_key_value_heads(activation, kv_heads):
    q, _, _, g = random_inputs(seq=SEQ, batch=(2, 4))
    _, k, v, _ = random_inputs(seq=SEQ, batch=(2, kv_heads), seed=3)
    repeat = lambda x: jnp.repeat(x, 4 // kv_heads, axis=1)

    def grads_through_repeat(impl):
        def f(q, k, v):
            return ex.attention(
                q, repeat(k), repeat(v), activation_function=activation, implementation=impl
            )

        out, vjp = jax.vjp(f, q, k, v)
        return [np.asarray(x) for x in (out, *vjp(g))]

    for name in serving(activation):
        got = out_and_grads(
            q, k, v, g, jit=True, activation_function=activation, implementation=PATHS[name]
        )
        assert_all_close(got, grads_through_repeat(PATHS[name]), jnp.float32, f" {name}")


def test_features_combine_under_jit_and_vmap():
    """Grouped heads, segments and a window together, jitted and vmapped over the
    batch (ids mapped too), equal the unmapped call."""
    q, _, _, _ = random_inputs(seq=SEQ, batch=(3, 4))
    _, k, v, _ = random_inputs(seq=SEQ, batch=(3, 2), seed=2)
    ids = jnp.stack([jnp.asarray(IDS), jnp.asarray(IDS[::-1]), jnp.zeros(SEQ, int)])
    call = lambda q, k, v, ids: ex.attention(
        q, k, v, activation_function="sigmoid", segment_ids=ids, sliding_window=6
    )
    mapped = jax.jit(jax.vmap(call))(q, k, v, ids)
    direct = call(q, k, v, ids[:, None, :])
    np.testing.assert_allclose(mapped, direct, **F32_OUT)


@pytest.mark.parametrize("heads", [2, 3])
def test_per_sequence_features_under_vmap_over_heads(heads):
    """vmapped over the heads axis (kept in place as a batch axis, not moved), each
    sequence's own segments and bias still apply to that sequence: equal the unmapped
    call, with as many heads as sequences too (where broadcasting against the wrong
    axis would not even fail)."""
    q, k, v, _ = random_inputs(seq=SEQ, batch=(2, heads))
    ids = jnp.stack([jnp.asarray(IDS), jnp.asarray(IDS[::-1])])
    bias = jnp.array([-1.0, -3.0])  # one per sequence
    call = lambda q, k, v, ids, bias: ex.attention(
        q, k, v, activation_function="sigmoid", segment_ids=ids, sigmoid_bias=bias
    )
    mapped = jax.vmap(lambda q, k, v: call(q, k, v, ids, bias), in_axes=1, out_axes=1)(q, k, v)
    direct = call(q, k, v, ids[:, None, :], bias[:, None])
    np.testing.assert_allclose(mapped, direct, **F32_OUT)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sliding_window=0), ValueError, "sliding_window"),
        (dict(sliding_window=2.0), TypeError, "sliding_window"),
        (dict(segment_ids=np.zeros(SEQ, np.float32)), TypeError, "segment_ids"),
        (dict(segment_ids=np.zeros((2, SEQ), int)), ValueError, "segment_ids"),
        (dict(segment_ids=np.zeros(SEQ + 1, int)), (TypeError, ValueError), "segment_ids"),
        (
            dict(segment_ids=np.zeros(SEQ, int), attention_mask=np.ones((SEQ, SEQ), bool)),
            ValueError,
            "segment_ids",
        ),
        (
            dict(sliding_window=3, attention_mask=np.ones((SEQ, SEQ), bool)),
            ValueError,
            "sliding_window",
        ),
    ],
)
def test_bad_segments_and_windows_name_the_argument(kwargs, error, match):
    q, k, v, _ = random_inputs(seq=SEQ, batch=(2, 3))
    with pytest.raises(error, match=match):
        ex.attention(q, k, v, **kwargs)


def test_bad_grouped_heads_name_the_argument():
    q, _, _, _ = random_inputs(seq=SEQ, batch=(2, 4))
    _, k, v, _ = random_inputs(seq=SEQ, batch=(2, 3))
    with pytest.raises(ValueError, match="divide"):
        ex.attention(q, k, v)
    with pytest.raises(ValueError, match="heads axis"):
        ex.attention(q, k[:, :2], v[:, :2], segment_ids=np.zeros((2, 4, SEQ), int))


@pytest.mark.parametrize("name", ["mosaic", "linear"])
def test_paths_without_a_feature_refuse_it_with_a_reason(name):
    q, k, v, _ = random_inputs(seq=32, batch=(2,), dqk=16, dv=16)
    kwargs = dict(activation_function="none", sliding_window=4, implementation=name)
    with pytest.raises(ValueError, match="cannot serve"):
        ex.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backend_with_grouped_heads_decodes_in_pieces_with_a_state_of_its_kv_heads(activation):
    config = ex.mLSTMBackendAttentionConfig(context_length=20, activation_function=activation)
    backend = eqx.filter_jit(ex.mLSTMBackendAttention(config, qk_head_dim=8))
    q, _, _, _ = random_inputs(seq=13, batch=(2, 4))
    _, k, v, _ = random_inputs(seq=13, batch=(2, 2), dv=8, seed=4)
    whole = backend(q, k, v)
    h1, state = backend(*(x[..., :5, :] for x in (q, k, v)), return_last_states=True)
    h2, state = backend(*(x[..., 5:9, :] for x in (q, k, v)), state=state, return_last_states=True)
    h3 = backend(*(x[..., 9:, :] for x in (q, k, v)), state=state)
    np.testing.assert_allclose(jnp.concatenate([h1, h2, h3], -2), whole, **F32_OUT)
    assert state.length.shape == (2, 2)  # the key/value heads, not the query heads


def _mixer_config(kv_heads):
    return ex.ModelConfig(
        vocab_size=11,
        context_length=32,
        embedding_dim=32,
        num_heads=4,
        num_kv_heads=kv_heads,
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function="sigmoid"),
    )


def test_grouped_mixer_equals_a_mixer_with_each_kv_head_repeated():
    import equinox as eqx

    grouped = ex.MultiHeadMixer(_mixer_config(2), key=jax.random.key(0))
    full = ex.MultiHeadMixer(_mixer_config(None), key=jax.random.key(0))

    def repeat(weight):  # (2 * d, E) -> (4 * d, E): kv head h // 2 for query head h
        return jnp.repeat(weight.reshape(2, -1, weight.shape[-1]), 2, axis=0).reshape(
            -1, weight.shape[-1]
        )

    full = eqx.tree_at(
        lambda m: (m.q_proj, m.k_proj.weight, m.v_proj.weight, m.gate_proj, m.out_proj),
        full,
        (
            grouped.q_proj,
            repeat(grouped.k_proj.weight),
            repeat(grouped.v_proj.weight),
            grouped.gate_proj,
            grouped.out_proj,
        ),
    )
    x = jax.random.normal(jax.random.key(1), (12, 32))
    np.testing.assert_allclose(grouped(x), full(x), **F32_OUT)
    y, state = grouped.decode(x)
    _, full_state = full.decode(x)
    np.testing.assert_allclose(y, grouped(x), **F32_OUT)
    assert state.keys.size * 2 == full_state.keys.size  # the cache of 2 heads, not 4


def test_num_kv_heads_must_divide_num_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        _mixer_config(3)


@pytest.mark.parametrize(
    "activation, window",
    [("softmax", 4), ("sigmoid", 1), ("none", 4), ("sigmoid", 40)],  # 40: past the context
)
def test_windowed_backend_decodes_in_pieces_with_a_ring_buffer_of_the_window(activation, window):
    config = ex.mLSTMBackendAttentionConfig(
        context_length=20, activation_function=activation, sliding_window=window
    )
    module = ex.mLSTMBackendAttention(config, qk_head_dim=8)
    backend = eqx.filter_jit(module)  # one compile per call, not per operation
    q, _, _, _ = random_inputs(seq=17, batch=(2, 4))
    _, k, v, _ = random_inputs(seq=17, batch=(2, 2), dv=8, seed=5)
    whole = backend(q, k, v)
    expected = ex.attention(
        q,
        k,
        v,
        activation_function=activation,
        sliding_window=window,
        sigmoid_bias=module.sigmoid_bias,
        implementation="reference",
    )
    np.testing.assert_allclose(whole, expected, **F32_OUT)
    outs, state = [], None
    for start, stop in ((0, 5), (5, 6), (6, 13), (13, 17)):  # steps shorter and longer than w
        piece = (x[..., start:stop, :] for x in (q, k, v))
        h, state = backend(*piece, state=state, return_last_states=True)
        outs.append(h)
    np.testing.assert_allclose(jnp.concatenate(outs, -2), whole, **F32_OUT)
    assert state.keys.shape == (2, 2, min(window, 20), 8)  # O(w), the kv heads only


def test_language_model_on_packed_documents_equals_each_document_alone():
    model = eqx.filter_jit(ex.LanguageModel(_mixer_config(2), key=jax.random.key(0)))
    tokens = jnp.arange(20) % 11
    ids = jnp.asarray([0] * 7 + [1] * 9 + [2] * 4)
    alone = jnp.concatenate([model(tokens[:7]), model(tokens[7:16]), model(tokens[16:])])
    np.testing.assert_allclose(model(tokens, ids), alone, **F32_OUT)


def test_backend_segments_are_for_parallel_calls_and_windows_are_checked():
    backend = ex.mLSTMBackendAttention(ex.mLSTMBackendAttentionConfig(context_length=8), 8)
    q, k, v, _ = random_inputs(seq=6, batch=(2,), dv=8)
    with pytest.raises(ValueError, match="segment_ids"):
        backend(q, k, v, return_last_states=True, segment_ids=jnp.zeros(6, int))
    with pytest.raises(ValueError, match="sliding_window"):
        ex.mLSTMBackendAttentionConfig(sliding_window=0)
