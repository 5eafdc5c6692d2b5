"""Properties of `eqx_xlstm.attention` and agreement with a float64 reference."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ACTIVATIONS, F32_OUT, naive_attention, random_inputs, random_mask

import eqx_xlstm as ex

PRE = ["none", "swish"]


def qkv(seed=0, dtype=jnp.float32, **kwargs):
    return random_inputs(seed=seed, dtype=dtype, **kwargs)[:3]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pre", PRE)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_float64(activation, pre, masked):
    q, k, v = qkv(seed=3)
    mask = random_mask(9, 1) if masked else None
    out = ex.attention(
        q, k, v, mask, activation_function=activation, qk_pre_activation_function=pre, theta=200.0
    )
    expected = naive_attention(
        q, k, v, None if mask is None else np.asarray(mask), activation, pre, 200.0
    )
    np.testing.assert_allclose(out, expected, **F32_OUT)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_causal_by_default(activation):
    q, k, v = qkv()
    causal = jnp.tril(jnp.ones((9, 9), bool))
    a = ex.attention(q, k, v, activation_function=activation)
    b = ex.attention(q, k, v, causal, activation_function=activation)
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_causality_later_keys_values_never_change_earlier_outputs(activation):
    q, k, v = qkv(seed=1)
    t = 5
    k2 = k.at[..., t:, :].add(10.0)
    v2 = v.at[..., t:, :].multiply(-3.0)
    a = ex.attention(q, k, v, activation_function=activation)
    b = ex.attention(q, k2, v2, activation_function=activation)
    np.testing.assert_array_equal(a[..., :t, :], b[..., :t, :])
    assert not np.allclose(a[..., t:, :], b[..., t:, :])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_and_head_independence(activation):
    q, k, v = qkv(seed=2)
    base = ex.attention(q, k, v, activation_function=activation)
    changed = ex.attention(
        q, k.at[1, 2].add(5.0), v.at[1, 2].add(5.0), activation_function=activation
    )
    untouched = np.ones((2, 3), bool)
    untouched[1, 2] = False
    np.testing.assert_array_equal(base[untouched], changed[untouched])
    assert not np.allclose(base[1, 2], changed[1, 2])


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jit_equals_eager(activation):
    q, k, v = qkv(seed=4)
    mask = random_mask(9, 4)
    eager = ex.attention(q, k, v, mask, activation_function=activation)
    jitted = eqx.filter_jit(ex.attention)(q, k, v, mask, activation_function=activation)
    np.testing.assert_allclose(eager, jitted, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vmap_over_heads_equals_loop(activation):
    q, k, v = qkv(seed=5)  # (B, NH, S, D)

    def one_head(q, k, v):
        return ex.attention(q, k, v, activation_function=activation)

    vmapped = eqx.filter_vmap(one_head, in_axes=1, out_axes=1)(q, k, v)
    looped = jnp.stack([one_head(q[:, h], k[:, h], v[:, h]) for h in range(3)], axis=1)
    np.testing.assert_allclose(vmapped, looped, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dtype_kept(dtype, activation):
    q, k, v = qkv(dtype=dtype)
    assert ex.attention(q, k, v, activation_function=activation).dtype == dtype


def test_qkv_dtype_casts_inputs_and_output():
    q, k, v = qkv()
    out = ex.attention(q.astype(jnp.bfloat16), k, v, qkv_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    out = ex.attention(q, k, v, qkv_dtype="bfloat16")
    assert out.dtype == jnp.bfloat16


def test_bf16_large_logits_stay_finite():
    q, k, v = qkv(batch=(1,), seq=64, dqk=64, dv=64, dtype=jnp.bfloat16)
    out = ex.attention(q * 100, k * 100, v)
    assert out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fully_masked_rows_are_zero_with_finite_gradients(activation):
    q, k, v = qkv(seed=6)
    mask = random_mask(9, 6).at[2].set(False).at[7].set(False)

    def loss(q, k, v):
        return jnp.sum(ex.attention(q, k, v, mask, activation_function=activation) ** 2)

    out = ex.attention(q, k, v, mask, activation_function=activation)
    np.testing.assert_array_equal(out[..., [2, 7], :], 0.0)
    assert np.isfinite(out).all()
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[0][..., [2, 7], :], 0.0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_masked_positions_get_exactly_zero_weight(activation):
    # With huge values at masked keys, any leak shows up in the output.
    q, k, v = qkv(seed=7)
    mask = random_mask(9, 7).at[jnp.diag_indices(9)].set(True)
    base = ex.attention(q, k, v, mask, activation_function=activation)
    # Rows that cannot see key 0 must ignore whatever value key 0 holds.
    blind_rows = np.nonzero(~np.asarray(mask)[:, 0])[0]
    assert blind_rows.size > 0
    poisoned = ex.attention(q, k, v.at[..., 0, :].set(1e30), mask, activation_function=activation)
    np.testing.assert_array_equal(base[..., blind_rows, :], poisoned[..., blind_rows, :])


def test_sigmoid_bias_default_and_override():
    q, k, v = qkv(seed=8)
    default = ex.attention(q, k, v, activation_function="sigmoid")
    explicit = ex.attention(q, k, v, activation_function="sigmoid", sigmoid_bias=-float(np.log(9)))
    other = ex.attention(q, k, v, activation_function="sigmoid", sigmoid_bias=0.0)
    np.testing.assert_allclose(default, explicit, atol=1e-6)
    np.testing.assert_allclose(
        other, naive_attention(q, k, v, activation="sigmoid", sigmoid_bias=0.0), **F32_OUT
    )


def test_silu_and_swish_are_the_same():
    q, k, v = qkv(seed=9)
    a = ex.attention(q, k, v, qk_pre_activation_function="silu")
    b = ex.attention(q, k, v, qk_pre_activation_function="swish")
    np.testing.assert_array_equal(a, b)


def test_single_position_and_no_heads_axis():
    q, k, v = qkv(batch=(), seq=1, dqk=4, dv=4)
    out = ex.attention(q, k, v)
    np.testing.assert_allclose(out, v, atol=1e-6)  # softmax over one key = 1
