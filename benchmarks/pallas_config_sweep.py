"""Sweep the Pallas kernels' configuration on a GPU, next to the peers.

Sweeps the Triton kernels (`implementation=Triton(forward=..., backward=...)`: block
sizes, warps, stages; benchmarks/mosaic_kernels.py times the Mosaic GPU ones) and
prints fwd and fwd+bwd times of causal attention (bf16,
B=4, NH=16, D=128, swish + RoPE) for each activation, with the largest error against
the reference path at S=300. Peers in the same run: bare cuDNN softmax (no RoPE), our
cuDNN path (swish + RoPE by XLA in front), and jax's own Mosaic GPU flash attention
(`jax.experimental.pallas.ops.gpu.attention_mgpu`, softmax, fp16, no RoPE) where it
runs (jax 0.11.2: forward only under the causal mask).
A configuration that does not fit the GPU's shared memory is reported as failed.

    python benchmarks/pallas_config_sweep.py --seq 8192     # GPU only
"""

import argparse

import jax
import jax.numpy as jnp
from timing import median_ms

import eqx_xlstm as ex
from eqx_xlstm.implementations import Triton

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq", type=int, default=8192)
parser.add_argument("--activations", default="sigmoid,softmax")
parser.add_argument("--repeats", type=int, default=10)
parser.add_argument("--no-sweep", action="store_true", help="defaults and peers only")
args = parser.parse_args()

B, H, D, S = 4, 16, 128, args.seq
# (query block, key block, warps, stages)
FWD_CONFIGS = [
    (64, 64, 4, 2),
    (128, 32, 4, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 32, 8, 3),
    (128, 64, 8, 3),
    (64, 32, 4, 3),
]
BWD_CONFIGS = [
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (32, 32, 4, 3),
    (64, 64, 8, 3),
    (32, 64, 4, 3),
]


def bench(fn, *xs):
    return median_ms(fn, *xs, repeats=args.repeats)


def fwd_and_bwd(fn):
    # With the loss value, so XLA cannot drop the forward kernel (see attention_speed.py).
    loss = lambda *x: jnp.sum(fn(*x).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def ours(activation, implementation):
    return lambda q, k, v: ex.attention(
        q,
        k,
        v,
        activation_function=activation,
        qk_pre_activation_function="swish",
        implementation=implementation,
    )


def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def mosaic_peer():
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    config = mgpu.TuningConfig(
        block_q=64,
        block_kv=128,
        max_concurrent_steps=2,
        causal=True,
        block_q_dkv=64,
        block_kv_dkv=64,
        block_q_dq=64,
        block_kv_dq=64,
    )
    return lambda q, k, v: mgpu.attention(q, k, v, config)


def report(label, run, xs):
    """Print `label` with the time of `run(*xs)`, or why it failed."""
    try:
        print(f"{label}: {bench(run, *xs):.2f} ms", flush=True)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"{label}: failed: {type(err).__name__}: {str(err).splitlines()[0][:150]}")


def both_passes(label, fn, xs):
    report(f"{label}: fwd", fn, xs)
    report(f"{label}: fwd+bwd", fwd_and_bwd(fn), xs)


def max_error(activation):
    small = [jax.random.normal(key, (2, 3, 300, D), jnp.bfloat16) for key in keys]
    got = ours(activation, Triton())(*small).astype(jnp.float32)
    want = ours(activation, "reference")(*small).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)))


keys = jax.random.split(jax.random.key(0), 3)
qkv = [jax.random.normal(key, (B, H, S, D), jnp.bfloat16) for key in keys]
bshd = [x.transpose(0, 2, 1, 3) for x in qkv]
print(
    f"device: {jax.devices()[0].device_kind}; bf16 B={B} NH={H} D={D} S={S}; jax {jax.__version__}"
)
both_passes("bare cuDNN softmax (no RoPE)", cudnn, bshd)
both_passes("ours cudnn softmax (swish+RoPE)", ours("softmax", "cudnn"), qkv)
try:
    # It computes in float16 only.
    f16 = [x.astype(jnp.float16) for x in bshd]
    both_passes("jax Mosaic GPU flash softmax (fp16, no RoPE)", mosaic_peer(), f16)
except Exception as err:  # noqa: BLE001
    print(f"jax Mosaic GPU flash softmax: unavailable: {type(err).__name__}: {err}")
for activation in args.activations.split(","):
    both_passes(f"{activation} triton defaults", ours(activation, Triton()), qkv)
    print(f"{activation} max error vs reference (S=300): {max_error(activation):.4f}")
    if args.no_sweep:
        continue
    for config in FWD_CONFIGS:
        report(f"{activation} fwd {config}", ours(activation, Triton(forward=config)), qkv)
    for config in BWD_CONFIGS:
        fn = fwd_and_bwd(ours(activation, Triton(backward=config)))
        report(f"{activation} fwd+bwd, bwd {config}", fn, qkv)
