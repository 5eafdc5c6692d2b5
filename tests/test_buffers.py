"""RoPE tables are buffers: no gradient, and kept out of the optimizer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_xlstm as ex


@pytest.fixture(autouse=True)
def standard_promotion():
    # optax mixes Python floats with int32 step counts internally.
    with jax.numpy_dtype_promotion("standard"):
        yield


class TinyMixer(eqx.Module):
    proj: eqx.nn.Linear
    backend: ex.mLSTMBackendAttention

    def __init__(self, key):
        self.proj = eqx.nn.Linear(8, 24, key=key)
        config = ex.mLSTMBackendAttentionConfig(context_length=12)
        self.backend = ex.mLSTMBackendAttention(config, qk_head_dim=8)

    def __call__(self, x):
        q, k, v = jnp.split(jax.vmap(self.proj)(x), 3, axis=-1)
        return self.backend(q, k, v)


def test_filter_marks_only_buffers_untrainable():
    model = TinyMixer(jax.random.key(0))
    spec = ex.trainable_filter(model)
    assert spec.proj.weight is True and spec.proj.bias is True
    assert spec.backend.freqs_sin is False and spec.backend.freqs_cos is False
    params, _ = eqx.partition(model, spec)
    assert params.backend.freqs_sin is None and params.proj.weight is not None


def adamw_steps(model, params_of, n_steps=5):
    x = jax.random.normal(jax.random.key(1), (10, 8))
    optimizer = optax.adamw(1e-2, weight_decay=0.5)
    params, static = eqx.partition(model, params_of(model))
    state = optimizer.init(params)

    @eqx.filter_jit
    def step(params, state):
        loss = lambda p: jnp.sum(eqx.combine(p, static)(x) ** 2)  # noqa: E731
        grads = eqx.filter_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    for _ in range(n_steps):
        params, state = step(params, state)
    return eqx.combine(params, static)


def test_adamw_with_weight_decay_leaves_buffers_bit_identical():
    model = TinyMixer(jax.random.key(0))
    trained = adamw_steps(model, ex.trainable_filter)
    np.testing.assert_array_equal(trained.backend.freqs_sin, model.backend.freqs_sin)
    np.testing.assert_array_equal(trained.backend.freqs_cos, model.backend.freqs_cos)
    assert not np.allclose(trained.proj.weight, model.proj.weight)


def test_without_the_filter_weight_decay_would_change_buffers():
    # Guards the test above: the naive filter really does let AdamW touch the tables.
    model = TinyMixer(jax.random.key(0))
    trained = adamw_steps(model, lambda m: eqx.is_inexact_array)
    assert not np.array_equal(trained.backend.freqs_sin, model.backend.freqs_sin)


def test_works_as_optax_masked_mask():
    model = TinyMixer(jax.random.key(0))
    optimizer = optax.masked(optax.adamw(1e-2, weight_decay=0.5), ex.trainable_filter(model))
    params = eqx.filter(model, eqx.is_inexact_array)
    state = optimizer.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, state, params)
    np.testing.assert_array_equal(updates.backend.freqs_sin, 0.0)
    assert np.abs(updates.proj.weight).max() > 0  # weight decay acted on the weights
