"""Bad input gets a clear TypeError/ValueError naming the argument, also under jit."""

import equinox as eqx
import jax.numpy as jnp
import pytest

import eqx_xlstm as ex


def arr(*shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


Q = arr(2, 5, 8)
V = arr(2, 5, 6)


def both_ways(fn):
    """Call `fn` eagerly and under eqx.filter_jit (errors must be the same)."""
    return [fn, eqx.filter_jit(fn)]


ATTENTION_CASES = [
    # (description, kwargs, error type, message pattern)
    ("head dims differ", dict(keys=arr(2, 5, 6)), TypeError, "keys"),
    ("seq differs for keys", dict(keys=arr(2, 4, 8)), TypeError, "keys"),
    ("seq differs for values", dict(values=arr(2, 4, 6)), TypeError, "values"),
    ("batch differs", dict(values=arr(3, 5, 6)), TypeError, "values"),
    ("odd head dim", dict(queries=arr(2, 5, 7), keys=arr(2, 5, 7)), ValueError, "even"),
    (
        "unknown activation",
        dict(activation_function="relu"),
        ValueError,
        "activation_function.*'softmax', 'sigmoid', 'none'",
    ),
    (
        "unknown pre-activation",
        dict(qk_pre_activation_function="gelu"),
        ValueError,
        "qk_pre_activation_function.*'none', 'swish', 'silu'",
    ),
    ("mask wrong shape", dict(attention_mask=jnp.ones((5, 4), bool)), TypeError, "attention_mask"),
    (
        "mask not square over seq",
        dict(attention_mask=jnp.ones((6, 6), bool)),
        TypeError,
        "attention_mask",
    ),
    (
        "mask not bool",
        dict(attention_mask=jnp.ones((5, 5), jnp.float32)),
        TypeError,
        "attention_mask",
    ),
    ("integer queries", dict(queries=arr(2, 5, 8, dtype=jnp.int32)), TypeError, "queries"),
    ("integer values", dict(values=arr(2, 5, 6, dtype=jnp.int32)), TypeError, "values"),
    (
        "mixed dtypes",
        dict(keys=arr(2, 5, 8, dtype=jnp.bfloat16)),
        TypeError,
        "share a dtype.*qkv_dtype",
    ),
    ("integer qkv_dtype", dict(qkv_dtype=jnp.int32), TypeError, "qkv_dtype"),
    ("theta zero", dict(theta=0.0), ValueError, "theta"),
    ("theta negative", dict(theta=-5.0), ValueError, "theta"),
    ("unknown implementation", dict(implementation="magic"), ValueError, "implementation"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "desc,kwargs,error,match", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES]
)
def test_attention_bad_input(desc, kwargs, error, match, jit):
    args = dict(queries=Q, keys=Q, values=V) | kwargs
    fn = eqx.filter_jit(ex.attention) if jit else ex.attention
    with pytest.raises(error, match=match):
        fn(**args)


@pytest.mark.parametrize("call", both_ways(ex.apply_rotary_emb))
def test_rope_explicit_freqs_shorter_than_seq(call):
    sin, cos = ex.precompute_freqs(8, 3)
    with pytest.raises(ValueError, match="shorter than the sequence length 5"):
        call(Q, Q, sin, cos)


@pytest.mark.parametrize("call", both_ways(ex.apply_rotary_emb))
def test_rope_bad_input(call):
    with pytest.raises(ValueError, match="even"):
        call(arr(5, 7), arr(5, 7))
    with pytest.raises(TypeError, match="xk"):
        call(arr(5, 8), arr(4, 8))
    with pytest.raises(ValueError, match="theta"):
        call(Q, Q, theta=0.0)
    sin, cos = ex.precompute_freqs(6, 10)
    with pytest.raises(ValueError, match="head dimension 8 needs 4"):
        call(Q, Q, sin, cos)
    with pytest.raises(ValueError, match="both"):
        call(Q, Q, freqs_sin=sin)


def test_precompute_freqs_bad_input():
    with pytest.raises(ValueError, match="theta"):
        ex.precompute_freqs(8, 4, theta=0.0)
    with pytest.raises(ValueError, match="feat_dim"):
        ex.precompute_freqs(0, 4)
    with pytest.raises(TypeError, match="feat_dim"):
        ex.precompute_freqs(8.0, 4)


def test_config_bad_values():
    with pytest.raises(ValueError, match="activation_function.*'softmax'"):
        ex.mLSTMBackendAttentionConfig(activation_function="relu")
    with pytest.raises(ValueError, match="qk_pre_activation_function"):
        ex.mLSTMBackendAttentionConfig(qk_pre_activation_function="tanh")
    with pytest.raises(ValueError, match="theta"):
        ex.mLSTMBackendAttentionConfig(theta=-1.0)
    with pytest.raises(ValueError, match="context_length"):
        ex.mLSTMBackendAttentionConfig(context_length=0)
    with pytest.raises(TypeError, match="context_length"):
        ex.mLSTMBackendAttentionConfig().assign_model_config_params(object())


def test_backend_construction_errors():
    with pytest.raises(ValueError, match="context_length.*never assigned"):
        ex.mLSTMBackendAttention(ex.mLSTMBackendAttentionConfig(), qk_head_dim=8)
    config = ex.mLSTMBackendAttentionConfig(context_length=8)
    with pytest.raises(ValueError, match="even"):
        ex.mLSTMBackendAttention(config, qk_head_dim=7)
    with pytest.raises(TypeError, match="config"):
        ex.mLSTMBackendAttention({"context_length": 8}, qk_head_dim=8)


BACKEND = ex.mLSTMBackendAttention(ex.mLSTMBackendAttentionConfig(context_length=4), qk_head_dim=8)


@pytest.mark.parametrize("call", both_ways(BACKEND))
def test_backend_call_errors(call):
    with pytest.raises(ValueError, match="context_length=4"):
        call(Q, Q, V)  # S = 5 > 4
    q4, v4 = arr(2, 4, 6), arr(2, 4, 6)
    with pytest.raises(ValueError, match="qk_head_dim=8"):
        call(q4, q4, v4)
    q4 = arr(2, 4, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        call(q4, q4, v4.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="'k'"):
        call(q4, arr(2, 3, 8), v4)
    state = arr(2, 8, 6)
    with pytest.raises(ValueError, match="n_initial=None"):
        call(q4, q4, v4, c_initial=state)
    with pytest.raises(ValueError, match="c_initial"):  # not this backend's state shape
        call(q4, q4, v4, c_initial=state, n_initial=state, m_initial=state)


def test_typechecking_switch():
    assert ex.typechecking_enabled()
    with pytest.raises(TypeError):
        ex.set_typechecking("no")
    ex.set_typechecking(False)
    try:
        assert not ex.typechecking_enabled()
    finally:
        ex.set_typechecking(True)
    assert ex.typechecking_enabled()


@pytest.mark.parametrize("setting,fails", [("1", True), ("0", False)])
def test_switch_really_turns_checking_off(setting, fails):
    # A subprocess without pytest's import hook: only our own checker is in play.
    # A float mask is a dtype mistake only the type checker catches.
    import subprocess
    import sys

    code = (
        "import jax.numpy as jnp, eqx_xlstm as ex\n"
        "q = jnp.ones((4, 8))\n"
        "try:\n"
        "    ex.attention(q, q, q, jnp.ones((4, 4)))\n"
        "    print('accepted')\n"
        "except TypeError as e:\n"
        "    print('rejected', 'attention_mask' in str(e))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "EQX_XLSTM_TYPECHECK": setting, "JAX_PLATFORMS": "cpu"},
    )
    assert result.stdout.strip() == ("rejected True" if fails else "accepted")
