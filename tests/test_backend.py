"""mLSTMBackendAttention: construction, equivalence with `attention`, jit/vmap, buffers."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32_OUT, naive_attention, random_inputs

import eqx_xlstm as ex


def make(context_length=16, head_dim=8, **kwargs):
    config = ex.mLSTMBackendAttentionConfig(context_length=context_length, **kwargs)
    return ex.mLSTMBackendAttention(config, qk_head_dim=head_dim)


def qkv(shape=(2, 3, 10, 8), dv=6, seed=0, dtype=jnp.float32):
    *batch, seq, dqk = shape
    return random_inputs(seq, tuple(batch), dqk, dv, dtype, seed)[:3]


def test_is_a_backend_with_buffers():
    backend = make(theta=500.0)
    assert isinstance(backend, ex.mLSTMBackend) and isinstance(backend, eqx.Module)
    assert backend.can_vmap_over_heads is True
    assert ex.mLSTMBackendAttention.config_class is ex.mLSTMBackendAttentionConfig
    assert backend.freqs_sin.shape == backend.freqs_cos.shape == (16, 4)
    sin, cos = ex.precompute_freqs(8, 16, 500.0)
    np.testing.assert_array_equal(backend.freqs_sin, sin)
    np.testing.assert_array_equal(backend.freqs_cos, cos)
    # The tables are array leaves, not static metadata.
    leaves = jax.tree.leaves(backend)
    assert len(leaves) == 2 and all(isinstance(x, jax.Array) for x in leaves)


def test_config_defaults_and_assignment():
    config = ex.mLSTMBackendAttentionConfig()
    assert (
        config.context_length,
        config.activation_function,
        config.qk_pre_activation_function,
        config.theta,
    ) == (-1, "softmax", "none", 1e4)

    @dataclasses.dataclass
    class ModelConfig:
        context_length: int = 32

    assigned = config.assign_model_config_params(ModelConfig())
    assert assigned.context_length == 32 and config.context_length == -1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.context_length = 5
    assert ex.mLSTMBackendAttentionConfig(qk_pre_activation_function="silu")


@pytest.mark.parametrize("activation", ["softmax", "none"])
@pytest.mark.parametrize("pre", ["none", "swish"])
def test_equals_attention_function(activation, pre):
    backend = make(activation_function=activation, qk_pre_activation_function=pre, theta=300.0)
    q, k, v = qkv()
    expected = ex.attention(
        q, k, v, activation_function=activation, qk_pre_activation_function=pre, theta=300.0
    )
    np.testing.assert_allclose(backend(q, k, v), expected, atol=1e-6)


def test_sigmoid_bias_uses_context_length():
    backend = make(context_length=16, activation_function="sigmoid")
    q, k, v = qkv()
    expected = naive_attention(q, k, v, activation="sigmoid", sigmoid_bias=-np.log(16))
    np.testing.assert_allclose(backend(q, k, v), expected, **F32_OUT)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_prefix_output_is_prefix_of_output(activation):
    backend = make(activation_function=activation)
    q, k, v = qkv(shape=(2, 16, 8))
    full = backend(q, k, v)
    for length in (1, 5, 11):
        part = backend(q[:, :length], k[:, :length], v[:, :length])
        np.testing.assert_allclose(part, full[:, :length], atol=1e-6)


def test_gates_are_ignored():
    backend = make()
    q, k, v = qkv()
    gates = jnp.ones(q.shape[:-1])
    np.testing.assert_array_equal(backend(q, k, v, gates, gates), backend(q, k, v))


def test_filter_jit_and_vmap_over_heads():
    backend = make(activation_function="sigmoid")
    q, k, v = qkv(seed=1)  # (B, NH, S, D)

    @eqx.filter_jit
    def run(backend, q, k, v):
        # The backend is closed over: its buffers must not be vmapped.
        return eqx.filter_vmap(lambda q, k, v: backend(q, k, v), in_axes=1, out_axes=1)(q, k, v)

    out = run(backend, q, k, v)
    looped = jnp.stack([backend(q[:, h], k[:, h], v[:, h]) for h in range(3)], axis=1)
    np.testing.assert_allclose(out, looped, atol=1e-6)
    # vmapping the module itself also leaves its buffers unbatched.
    direct = eqx.filter_vmap(backend, in_axes=1, out_axes=1)(q, k, v)
    np.testing.assert_allclose(direct, looped, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_kept(dtype):
    q, k, v = qkv(dtype=dtype)
    assert make()(q, k, v).dtype == dtype


def test_no_gradient_into_buffers():
    q, k, v = qkv()

    def loss(backend):
        return jnp.sum(backend(q, k, v) ** 2)

    grads = eqx.filter_grad(loss)(make())
    np.testing.assert_array_equal(grads.freqs_sin, 0.0)
    np.testing.assert_array_equal(grads.freqs_cos, 0.0)
