"""The multi-head layer, block and language model; registry."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_xlstm as ex


def small_config(**kwargs):
    base = dict(vocab_size=32, context_length=16, embedding_dim=32, num_heads=4, num_blocks=2)
    return ex.ModelConfig(**(base | kwargs))


def tokens(n=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (n,), 0, 32)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_model_shapes_jit_and_batch_vmap(activation):
    config = small_config(
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function=activation)
    )
    model = ex.LanguageModel(config, key=jax.random.key(0))
    logits = eqx.filter_jit(model)(tokens())
    assert logits.shape == (12, 32) and logits.dtype == jnp.float32
    if activation == "softmax":  # eager, op by op (slow on a CPU: once is enough)
        np.testing.assert_allclose(model(tokens()), logits, atol=1e-5)
    batch = jnp.stack([tokens(12, s) for s in range(3)])
    batched = eqx.filter_jit(eqx.filter_vmap(model))(batch)
    # (1e-4: a GPU may pick other float32 matmul algorithms for the batched shapes)
    np.testing.assert_allclose(batched[1], eqx.filter_jit(model)(batch[1]), atol=1e-4)


def test_model_is_causal():
    model = ex.LanguageModel(small_config(), key=jax.random.key(0))
    a, b = tokens(), tokens().at[7].set(5)
    la, lb = model(a), model(b)
    np.testing.assert_array_equal(la[:7], lb[:7])
    assert not np.allclose(la[7:], lb[7:])


def test_mixer_equals_running_backend_per_head():
    config = small_config()
    mixer = ex.MultiHeadMixer(config, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (10, 32))
    project = lambda layer: jax.vmap(layer)(x).reshape(10, 4, 8)  # noqa: E731
    q, k, v = project(mixer.q_proj), project(mixer.k_proj), project(mixer.v_proj)
    heads = [mixer.backend(q[:, h], k[:, h], v[:, h]) for h in range(4)]
    expected = jax.vmap(mixer.out_proj)(jnp.concatenate(heads, axis=-1))
    np.testing.assert_allclose(mixer(x), expected, atol=1e-5)


def test_model_config_fills_backend_context_length():
    config = small_config(context_length=24)
    model = ex.LanguageModel(config, key=jax.random.key(0))
    backend = model.blocks[0].mixer.backend
    assert backend.config.context_length == 24 and backend.freqs_sin.shape == (24, 4)


def test_model_config_errors():
    with pytest.raises(ValueError, match="Unknown mLSTM backend 'slstm'.*'attention'"):
        small_config(backend="slstm")
    with pytest.raises(TypeError, match="backend_config"):
        small_config(backend_config={"activation_function": "none"})
    with pytest.raises(ValueError, match="num_heads"):
        small_config(embedding_dim=30)
    with pytest.raises(ValueError, match="vocab_size"):
        small_config(vocab_size=0)
    model = ex.LanguageModel(small_config(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="context_length=16"):
        model(jnp.zeros(17, jnp.int32))
    with pytest.raises(TypeError, match="tokens"):
        model(jnp.zeros(8, jnp.float32))


def test_registry():
    backend = ex.create_mlstm_backend(
        "attention", qk_head_dim=8, context_length=10, activation_function="none"
    )
    assert isinstance(backend, ex.mLSTMBackendAttention)
    assert backend.config.activation_function == "none"
    config = ex.mLSTMBackendAttentionConfig(context_length=6)
    other = ex.create_mlstm_backend("attention", qk_head_dim=4, config=config, theta=50.0)
    assert other.config == dataclasses.replace(config, theta=50.0)
    with pytest.raises(ValueError, match="valid names are 'attention'"):
        ex.create_mlstm_backend("flash", qk_head_dim=8)


def test_training_steps_leave_buffers_bit_identical():
    model = ex.LanguageModel(small_config(), key=jax.random.key(0))
    params, static = eqx.partition(model, ex.trainable_filter(model))
    optimizer = optax.adamw(1e-2, weight_decay=0.5)
    state = optimizer.init(params)
    batch = jnp.stack([tokens(12, s) for s in range(4)])

    @eqx.filter_jit
    def step(params, state):
        def loss(p):
            logits = jax.vmap(eqx.combine(p, static))(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        grads = eqx.filter_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):
        for _ in range(3):
            params, state = step(params, state)
    trained = eqx.combine(params, static)
    for before, after in zip(model.blocks, trained.blocks):
        np.testing.assert_array_equal(before.mixer.backend.freqs_sin, after.mixer.backend.freqs_sin)
        np.testing.assert_array_equal(before.mixer.backend.freqs_cos, after.mixer.backend.freqs_cos)
    assert not np.allclose(trained.head.weight, model.head.weight)


def test_model_config_round_trips_through_json():
    # A checkpoint header holds the config as data, enough to rebuild the model.
    import json

    backend = ex.mLSTMBackendAttentionConfig(
        activation_function="sigmoid",
        theta=np.float32(500.0),
        implementation=ex.implementations.Triton(forward=(64, 32, 4, 2)),
    )
    config = small_config(num_heads=np.int64(2), backend_config=backend)
    assert config.num_heads == 2 and type(config.num_heads) is int
    data = json.loads(json.dumps(config.to_dict()))
    rebuilt = ex.ModelConfig.from_dict(data)
    assert rebuilt == config
    assert rebuilt.backend_config.implementation.forward == (64, 32, 4, 2)
    model = ex.LanguageModel(rebuilt, key=jax.random.key(0))
    assert model.blocks[0].mixer.backend.config.theta == 500.0


def test_token_ids_outside_the_vocabulary_are_refused_eagerly():
    model = ex.LanguageModel(small_config(), key=jax.random.key(0))
    for bad in (jnp.array([1, 2, 32]), jnp.array([-1, 2])):
        with pytest.raises(ValueError, match="outside the vocabulary 0..31"):
            model(bad)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model.generate(bad, 2, jax.random.key(0))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(jnp.zeros((0,), jnp.int32), 2, jax.random.key(0))
    # Under jit the ids are not known while tracing: no error (README says so).
    assert eqx.filter_jit(model)(jnp.array([1, 2, 32])).shape == (3, 32)
    # Ids closed over by a jitted function are concrete: checked, without tracing.
    tokens = jnp.array([1, 2, 3])
    loss = eqx.filter_jit(jax.grad(lambda m: jnp.sum(m(tokens) ** 2)))
    assert loss(model).embedding.weight.shape == model.embedding.weight.shape
    bad = jnp.array([1, 2, 32])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eqx.filter_jit(lambda m: m(bad))(model)
