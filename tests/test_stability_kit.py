"""The layers' options for stable sigmoid training: QK-norm, LayerScale and hybrid
(post-branch) norm."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_xlstm as ex


def config(**changes):
    base = dict(
        vocab_size=13,
        context_length=16,
        embedding_dim=16,
        num_heads=2,
        backend_config=ex.mLSTMBackendAttentionConfig(activation_function="sigmoid"),
    )
    return ex.ModelConfig(**(base | changes))


X = jax.random.normal(jax.random.key(1), (12, 16))


# Jitted: one compile per call instead of one per operation (the tests' time).
decode = eqx.filter_jit(lambda model, tokens, states=None: model.decode(tokens, states))
whole = eqx.filter_jit(lambda model, tokens: model(tokens))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_the_mixer_blind_to_the_scale_of_queries_and_keys(qk_norm):
    mixer = ex.MultiHeadMixer(config(qk_norm=qk_norm), key=jax.random.key(0))
    louder = eqx.tree_at(
        lambda m: (m.q_proj.weight, m.k_proj.weight),
        mixer,
        (mixer.q_proj.weight * 30.0, mixer.k_proj.weight * 30.0),
    )
    # Full float32 products (a GPU's default TF32 would blur the comparison at 1e-4).
    with jax.default_matmul_precision("highest"):
        same = np.allclose(mixer(X), louder(X), atol=1e-4, rtol=1e-4)
    assert same == qk_norm


def test_layer_scale_starts_at_its_value_and_zero_makes_the_block_the_identity():
    block = ex.Block(config(layer_scale=0.25), key=jax.random.key(0))
    np.testing.assert_array_equal(block.mixer_scale, np.full(16, 0.25, np.float32))
    np.testing.assert_array_equal(block.ffn_scale, np.full(16, 0.25, np.float32))
    off = eqx.tree_at(lambda b: (b.mixer_scale, b.ffn_scale), block, (jnp.zeros(16), jnp.zeros(16)))
    np.testing.assert_array_equal(off(X), X)
    assert not np.allclose(block(X), X)
    grads = eqx.filter_jit(jax.grad(lambda b: jnp.sum(b(X) ** 2)))(block)
    assert float(jnp.abs(grads.mixer_scale).max()) > 0  # learnt


def test_post_norm_normalises_each_branch_before_it_joins():
    block = ex.Block(config(post_norm=True, layer_scale=1.0), key=jax.random.key(0))
    only_mixer = eqx.tree_at(lambda b: b.ffn_scale, block, jnp.zeros(16))
    branch = np.asarray(only_mixer(X) - X)
    np.testing.assert_allclose(branch.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(branch.std(-1), 1.0, atol=1e-2)


def test_kit_decodes_in_pieces_like_the_parallel_pass():
    model = ex.LanguageModel(
        config(qk_norm=True, layer_scale=0.1, post_norm=True), key=jax.random.key(0)
    )
    tokens = jnp.arange(11) % 13
    first, states = decode(model, tokens[:4])
    rest, _ = decode(model, tokens[4:], states)
    np.testing.assert_allclose(jnp.concatenate([first, rest]), whole(model, tokens), atol=1e-5)


@pytest.mark.parametrize(
    "changes, error",
    [
        (dict(qk_norm="yes"), TypeError),
        (dict(post_norm=1), TypeError),
        (dict(layer_scale=0.0), ValueError),
        (dict(layer_scale="0.1"), TypeError),
    ],
)
def test_bad_kit_options_name_the_field(changes, error):
    (name,) = changes
    with pytest.raises(error, match=name):
        config(**changes)


def test_kit_options_survive_the_config_round_trip():
    cfg = config(qk_norm=True, layer_scale=0.5, post_norm=True)
    assert ex.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_an_array_sigmoid_bias_is_a_learnable_per_head_bias():
    """As an array the bias equals the fixed bias head by head, and the chunked path's
    gradient for it equals the reference's (autodiff through S x S weights)."""
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (2, 4, 37, 8))
    k, v = (jax.random.normal(key, (2, 2, 37, 8)) for key in keys[1:])
    bias = jnp.array([-1.0, -2.0, -3.0, -0.5])
    call = lambda b, impl: ex.attention(
        q, k, v, activation_function="sigmoid", sigmoid_bias=b, implementation=impl
    )
    per_head = [
        ex.attention(
            q[:, h : h + 1],
            k[:, h // 2 : h // 2 + 1],
            v[:, h // 2 : h // 2 + 1],
            activation_function="sigmoid",
            sigmoid_bias=float(bias[h]),
        )
        for h in range(4)
    ]
    np.testing.assert_allclose(call(bias, "chunked"), jnp.concatenate(per_head, 1), atol=1e-5)
    grads = [
        jax.grad(lambda b, i=i: jnp.sum(call(b, i) ** 2))(bias) for i in ("reference", "chunked")
    ]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4)
    assert float(jnp.abs(grads[0]).min()) > 0


def test_learned_sigmoid_bias_starts_at_the_fixed_one_and_decodes_like_the_parallel_pass():
    fixed = ex.LanguageModel(config(num_kv_heads=1), key=jax.random.key(0))
    learned = ex.LanguageModel(
        config(num_kv_heads=1, learned_sigmoid_bias=True), key=jax.random.key(0)
    )
    tokens = jnp.arange(11) % 13
    np.testing.assert_allclose(whole(learned, tokens), whole(fixed, tokens), atol=1e-5)
    moved = eqx.tree_at(lambda m: m.blocks[0].mixer.sigmoid_bias, learned, jnp.array([-1.0, -4.0]))
    first, states = decode(moved, tokens[:4])
    rest, _ = decode(moved, tokens[4:], states)
    np.testing.assert_allclose(jnp.concatenate([first, rest]), whole(moved, tokens), atol=1e-5)
    grads = eqx.filter_jit(jax.grad(lambda m: jnp.sum(m(tokens) ** 2)))(moved)
    assert float(jnp.abs(grads.blocks[0].mixer.sigmoid_bias).max()) > 0


def test_bad_array_bias_names_it():
    x = jnp.ones((2, 3, 8, 8))
    with pytest.raises(ValueError, match="sigmoid_bias"):
        ex.attention(x, x, x, sigmoid_bias=jnp.zeros(3))  # softmax
    with pytest.raises(ValueError, match="sigmoid_bias"):
        ex.attention(x, x, x, activation_function="sigmoid", sigmoid_bias=jnp.zeros(4))
    with pytest.raises(ValueError, match="cannot serve"):
        x16 = jnp.ones((2, 3, 16, 16))
        ex.attention(
            x16,
            x16,
            x16,
            activation_function="sigmoid",
            sigmoid_bias=jnp.zeros(3),
            implementation="mosaic",  # takes the bias as a number only
        )
