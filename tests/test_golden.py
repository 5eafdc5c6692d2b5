"""The upstream reference vectors in ../shared/golden (README there)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BF16,
    F32_GRAD,
    F32_OUT,
    FREQS,
    ROPE,
    SMALL_CHUNKED,
    SMALL_LINEAR,
    golden_cases,
    here,
    load_golden,
)

import eqx_xlstm as ex
from eqx_xlstm.implementations import CuDNN, Triton


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
def test_attention_golden_chunked_path(case):
    # Blocks of 5, so S is rarely a multiple. The default path above is the reference
    # at these sizes on a CPU (test_dispatch.py::test_default_table_on_a_cpu); the
    # kernels follow below.
    archive, _ = load_golden()
    check_case(case, archive, implementation=SMALL_CHUNKED)


def _causal_none(case):
    return case["activation_function"] == "none" and case["mask"] == "causal"


@pytest.mark.parametrize("case", golden_cases("attn", _causal_none))
def test_attention_golden_linear_path(case):
    archive, _ = load_golden()
    check_case(case, archive, implementation=SMALL_LINEAR)


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


def _serves(implementation):
    """Whether `implementation` serves a golden case on this machine."""

    def keep(case):
        dtype = jnp.dtype(case["input_dtype"])
        dims = dict(dqk=case["q_shape"][-1], dv=case["v_shape"][-1])
        causal = "causal" if case["mask"] == "causal" else "explicit"
        spec = here(activation=case["activation_function"], mask=causal, dtype=dtype, **dims)
        return implementation.unsupported(spec) is None

    return keep


@pytest.mark.parametrize("case", golden_cases("attn", _serves(CuDNN())))
def test_attention_golden_cudnn_path(case):
    archive, _ = load_golden()
    check_case(case, archive, implementation="cudnn")


@pytest.mark.parametrize("case", golden_cases("attn", _serves(Triton())))
def test_attention_golden_triton_path(case):
    # Pallas interpret mode on a CPU, the Triton kernels on a GPU.
    archive, _ = load_golden()
    check_case(case, archive, implementation="triton")
