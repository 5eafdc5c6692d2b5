"""Incremental decoding: states in and out of the attention backend, and generate."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ACTIVATIONS, random_inputs

import eqx_xlstm as ex


def make(activation="softmax", pre="none", context_length=24, head_dim=8, theta=1e4):
    config = ex.mLSTMBackendAttentionConfig(
        context_length=context_length,
        activation_function=activation,
        qk_pre_activation_function=pre,
        theta=theta,
    )
    return ex.mLSTMBackendAttention(config, qk_head_dim=head_dim)


def qkv(shape=(2, 3, 20, 8), dv=6, seed=0):
    *batch, seq, dqk = shape
    return random_inputs(seq, tuple(batch), dqk, dv, seed=seed)[:3]


def arrays_step(b, q, k, v, *state):
    """The mLSTM cell's interface: the state as three arrays (c, n, m)."""
    h, (c, n, m) = b(q, k, v, None, None, *state, return_last_states=True)
    return h, (c, n, m)


def typed_step(b, q, k, v, *state):
    """The typed state, passed whole."""
    h, new = b(q, k, v, return_last_states=True, state=state[0] if state else None)
    return h, (new,)


def in_pieces(backend, q, k, v, pieces, step=arrays_step):
    """Outputs of feeding the sequence in `pieces` (lengths), state carried along."""
    outputs, state, start = [], (), 0
    for length in pieces:
        part = slice(start, start + length)
        h, state = step(backend, q[..., part, :], k[..., part, :], v[..., part, :], *state)
        outputs.append(h)
        start += length
    return jnp.concatenate(outputs, axis=-2), state


CHUNKINGS = {"prompt-then-tokens": [5] + [1] * 15, "uneven": [3, 1, 4, 1, 5, 2, 4]}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("chunking, pre", [("prompt-then-tokens", "none"), ("uneven", "swish")])
def test_pieces_equal_parallel_call(activation, pre, chunking):
    backend = make(activation, pre)
    q, k, v = qkv()
    step = typed_step if chunking == "uneven" else arrays_step
    pieces, state = in_pieces(backend, q, k, v, CHUNKINGS[chunking], step)
    np.testing.assert_allclose(pieces, backend(q, k, v), atol=1e-5, rtol=1e-5)
    _, _, m = state[0] if len(state) == 1 else state
    np.testing.assert_array_equal(m, 20)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_pieces_under_jit_and_vmapped_over_heads(activation):
    backend = make(activation)
    q, k, v = qkv(shape=(2, 3, 12, 8))  # (B, NH, S, D)

    @eqx.filter_jit
    def step(backend, q, k, v, *state):
        def one_head(q, k, v, state):
            return backend(q, k, v, return_last_states=True, state=state)

        state = state[0] if state else None
        h, state = eqx.filter_vmap(one_head, in_axes=1, out_axes=1)(q, k, v, state)
        return h, (state,)

    pieces, _ = in_pieces(backend, q, k, v, [4, 1, 1, 3, 1, 2], step=step)
    np.testing.assert_allclose(pieces, backend(q, k, v), atol=1e-5, rtol=1e-5)


def test_none_state_size_does_not_depend_on_prompt_length():
    backend = make("none", context_length=64)
    sizes = set()
    for prompt in (1, 10, 50):
        q, k, v = qkv(shape=(2, prompt, 8))
        _, state = backend(q, k, v, return_last_states=True)
        sizes.add(tuple(x.shape for x in state))
    assert sizes == {((2, 8, 6), (2, 8), (2,))}


@pytest.mark.parametrize("activation", ["softmax", "none"])
def test_one_compiled_step_serves_every_position(activation):
    backend = make(activation)
    q, k, v = qkv(shape=(2, 20, 8))
    traces = []

    @eqx.filter_jit
    def step(backend, q, k, v, *state):
        traces.append(1)  # runs once per trace
        return backend(q, k, v, None, None, *state, return_last_states=True)

    _, state = backend(q[:, :4], k[:, :4], v[:, :4], return_last_states=True)
    outputs = []
    for t in range(4, 20):
        h, state = step(backend, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], *state)
        outputs.append(h)
    assert len(traces) == 1
    np.testing.assert_allclose(
        jnp.concatenate(outputs, 1), backend(q, k, v)[:, 4:], atol=1e-5, rtol=1e-5
    )


def test_state_contents_documented():
    backend = make("softmax", context_length=10)
    q, k, v = qkv(shape=(3, 4, 8))
    _, state = backend(q, k, v, return_last_states=True)
    assert isinstance(state, ex.KVCache)
    c, n, m = state  # the mLSTM cell's names
    assert (c, n, m) == (state.keys, state.values, state.length)
    assert c.shape == (3, 10, 8) and n.shape == (3, 10, 6) and m.shape == (3,)
    np.testing.assert_array_equal(n[:, :4], v)
    np.testing.assert_array_equal(n[:, 4:], 0.0)
    rotated, _ = ex.apply_rotary_emb(k, k)
    np.testing.assert_allclose(c[:, :4], rotated, atol=1e-6)
    np.testing.assert_array_equal(m, 4)
    _, linear = make("none")(q, k, v, return_last_states=True)
    assert isinstance(linear, ex.LinearState)
    c, n, m = linear
    np.testing.assert_allclose(c, jnp.einsum("bsd,bsv->bdv", rotated, v), atol=1e-5)
    np.testing.assert_allclose(n, rotated.sum(1), atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "none"])
def test_decoding_past_context_length(activation):
    backend = make(activation, context_length=6)
    q, k, v = qkv(shape=(2, 6, 8))
    _, state = backend(q[:, :5], k[:, :5], v[:, :5], return_last_states=True)
    with pytest.raises(ValueError, match="past context_length=6"):
        backend(q[:, :2], k[:, :2], v[:, :2], None, None, *state)
    _, full = backend(q[:, :1], k[:, :1], v[:, :1], None, None, *state, return_last_states=True)
    step = eqx.filter_jit(lambda b, q, k, v, *s: b(q, k, v, None, None, *s))
    with pytest.raises(Exception, match="past context_length=6"):
        jax.block_until_ready(step(backend, q[:, :1], k[:, :1], v[:, :1], *full))


def test_state_from_another_backend_is_refused():
    q, k, v = qkv(shape=(2, 4, 8))
    _, state = make("softmax")(q, k, v, return_last_states=True)
    with pytest.raises(ValueError, match="context_length=30"):
        make("softmax", context_length=30)(q, k, v, None, None, *state)
    with pytest.raises(ValueError, match="activation_function='none'"):
        make("none")(q, k, v, None, None, *state)
    q4, k4 = qkv(shape=(2, 4, 4))[:2]
    _, small = make("softmax", head_dim=4)(q4, k4, v, return_last_states=True)
    with pytest.raises(ValueError, match="qk_head_dim=8"):
        make("softmax")(q, k, v, None, None, *small)


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(theta=500.0), "theta=500.0"),
        (dict(pre="swish"), "pre_activation='swish'"),
        (dict(context_length=30), "context_length=30"),
        (dict(activation="sigmoid"), "activation='sigmoid'"),
    ],
)
def test_typed_state_from_another_configuration_is_refused(other, message):
    # Same shapes, other settings: arrays alone could not tell, the typed state does.
    q, k, v = qkv(shape=(2, 4, 8))
    _, state = make(**({"context_length": 24} | other))(q, k, v, return_last_states=True)
    with pytest.raises(ValueError, match=f"other settings: {message}"):
        make()(q, k, v, state=state)
    with pytest.raises(TypeError, match="state"):
        make()(q, k, v, state=tuple(state))
    with pytest.raises(ValueError, match="not both"):
        make()(q, k, v, None, None, *make()(q, k, v, return_last_states=True)[1], state=state)


def test_typed_state_of_another_batch_is_refused():
    q, k, v = qkv(shape=(2, 4, 8))
    _, state = make()(q, k, v, return_last_states=True)
    q3, k3, v3 = qkv(shape=(3, 4, 8))
    with pytest.raises(ValueError, match="batch shape"):
        make()(q3, k3, v3, state=state)


def test_mixed_batch_shapes_are_refused():
    backend = make("none")
    q, k, v = qkv(shape=(2, 4, 8))
    _, (c, n, m) = backend(q, k, v, return_last_states=True)
    _, (c3, _, _) = backend(*qkv(shape=(3, 4, 8)), return_last_states=True)
    with pytest.raises(ValueError, match="c_initial.*batch shape"):
        backend(q, k, v, None, None, c3, n, m)
    with pytest.raises(ValueError, match="m_initial"):
        backend(q, k, v, None, None, c, n, m[:1])
    with pytest.raises(ValueError, match="integer"):
        backend(q, k, v, None, None, c, n, m.astype(jnp.float32))


def test_partial_states_are_refused():
    q, k, v = qkv(shape=(2, 4, 8))
    _, (c, n, m) = make()(q, k, v, return_last_states=True)
    with pytest.raises(ValueError, match="m_initial=None"):
        make()(q, k, v, None, None, c, n)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_greedy_generate_matches_full_recompute(activation):
    config = ex.ModelConfig(
        vocab_size=32,
        context_length=32,
        embedding_dim=32,
        num_heads=4,
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function=activation),
    )
    model = ex.LanguageModel(config, key=jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (8,), 0, 32)
    generated = eqx.filter_jit(model.generate)(prompt, 12, jax.random.key(2), temperature=0.0)
    assert generated.shape == (12,) and generated.dtype == prompt.dtype
    sequence = jnp.concatenate([prompt, generated])
    np.testing.assert_array_equal(jnp.argmax(model(sequence[:-1]), -1)[7:], generated)


def test_generate_sampling_options_and_errors():
    config = ex.ModelConfig(vocab_size=32, context_length=16, embedding_dim=32, num_heads=4)
    model = ex.LanguageModel(config, key=jax.random.key(0))
    prompt = jnp.arange(4)
    a = model.generate(prompt, 6, jax.random.key(3), temperature=1.0, top_k=1)
    greedy = model.generate(prompt, 6, jax.random.key(9), temperature=0.0)
    np.testing.assert_array_equal(a, greedy)  # top_k=1 is greedy
    b = model.generate(prompt, 6, jax.random.key(3), temperature=2.0)
    np.testing.assert_array_equal(b, model.generate(prompt, 6, jax.random.key(3), temperature=2.0))
    with pytest.raises(ValueError, match="context_length=16"):
        model.generate(prompt, 14, jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, jax.random.key(0), top_k=0)
    with pytest.raises(ValueError, match="n_tokens"):
        model.generate(prompt, 0, jax.random.key(0))
