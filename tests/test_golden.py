"""The upstream reference vectors in ../shared/golden (README there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BF16, F32_GRAD, F32_OUT, FREQS, ROPE, golden_cases, load_golden

import eqx_xlstm as ex


def run_case(case, archive, **kwargs):
    """Output and (dq, dk, dv) of `attention` on one golden case, as float32."""
    prefix = f"attn/{case['id']}/"
    dtype = jnp.bfloat16 if case["input_dtype"] == "bfloat16" else jnp.float32
    q, k, v = (jnp.asarray(archive[prefix + n], dtype) for n in "qkv")
    mask = archive[prefix + "mask"] if case["mask"] != "causal" else None
    mask = None if mask is None else jnp.asarray(mask)

    def fn(q, k, v):
        return ex.attention(
            q,
            k,
            v,
            attention_mask=mask,
            qkv_dtype=case["qkv_dtype"],
            activation_function=case["activation_function"],
            qk_pre_activation_function=case["qk_pre_activation_function"],
            theta=case["theta"],
            **kwargs,
        )

    out, vjp = jax.vjp(fn, q, k, v)
    assert out.dtype == dtype
    grads = vjp(jnp.asarray(archive[prefix + "cotangent"], dtype))
    to32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    return to32(out), [to32(g) for g in grads]


def check_case(case, archive, **kwargs):
    out, grads = run_case(case, archive, **kwargs)
    prefix = f"attn/{case['id']}/"
    bf16 = case["input_dtype"] == "bfloat16"
    np.testing.assert_allclose(out, archive[prefix + "out"], **(BF16 if bf16 else F32_OUT))
    for name, grad in zip(("dq", "dk", "dv"), grads):
        np.testing.assert_allclose(
            grad, archive[prefix + name], **(BF16 if bf16 else F32_GRAD), err_msg=name
        )


@pytest.mark.parametrize("case", golden_cases("attn"))
def test_attention_golden(case):
    archive, _ = load_golden()
    check_case(case, archive)


@pytest.mark.parametrize("case", golden_cases("attn"))
def test_attention_golden_chunked_path(case, small_blocks):
    # small_blocks: blocks of 5 and linear chunks of 4, so S is rarely a multiple. The
    # default path above is the reference at these sizes on a CPU
    # (test_implementations.py::test_default_selection); cuDNN and Pallas follow below.
    archive, _ = load_golden()
    check_case(case, archive, implementation="chunked")


@pytest.mark.parametrize("case", golden_cases("freqs"))
def test_precompute_freqs_golden(case):
    archive, _ = load_golden()
    sin, cos = ex.precompute_freqs(case["feat_dim"], case["max_length"], case["theta"])
    assert sin.dtype == cos.dtype == jnp.float32
    np.testing.assert_allclose(sin, archive[f"freqs/{case['id']}/sin"], **FREQS)
    np.testing.assert_allclose(cos, archive[f"freqs/{case['id']}/cos"], **FREQS)


@pytest.mark.parametrize("case", golden_cases("rope"))
def test_apply_rotary_emb_golden(case):
    archive, _ = load_golden()
    prefix = f"rope/{case['id']}/"
    freqs = {}
    if case["explicit_freqs"]:
        freqs = dict(
            freqs_sin=jnp.asarray(archive[prefix + "freqs_sin"]),
            freqs_cos=jnp.asarray(archive[prefix + "freqs_cos"]),
        )
    xq, xk = ex.apply_rotary_emb(
        jnp.asarray(archive[prefix + "xq"]),
        jnp.asarray(archive[prefix + "xk"]),
        theta=case["theta"],
        **freqs,
    )
    assert xq.shape == tuple(case["x_shape"])
    np.testing.assert_allclose(xq, archive[prefix + "xq_out"], **ROPE)
    np.testing.assert_allclose(xk, archive[prefix + "xk_out"], **ROPE)


def _cudnn_cases():
    return [
        p
        for p in golden_cases("attn")
        if p.values[0] is None
        or (
            p.values[0]["input_dtype"] == "bfloat16"
            and p.values[0]["activation_function"] == "softmax"
            and p.values[0]["mask"] == "causal"
        )
    ]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("case", _cudnn_cases())
def test_attention_golden_cudnn_path(case):
    archive, _ = load_golden()
    check_case(case, archive, implementation="cudnn")


def _pallas_cases():
    from eqx_xlstm._dispatch import pallas_unsupported

    def eligible(case):
        dqk, dv = case["q_shape"][-1], case["v_shape"][-1]
        dtype = jnp.dtype(case["input_dtype"])
        causal = case["mask"] == "causal"
        return pallas_unsupported(case["activation_function"], causal, dtype, dqk, dv) is None

    return [p for p in golden_cases("attn") if p.values[0] is None or eligible(p.values[0])]


@pytest.mark.parametrize("case", _pallas_cases())
def test_attention_golden_pallas_path(case):
    # Pallas interpret mode on a CPU, the Triton kernels on a GPU.
    archive, _ = load_golden()
    check_case(case, archive, implementation="pallas")
