"""Attention speed and memory, side by side in one process.

Compares, for each activation, sequence length and pass (fwd, fwd+bwd):

- `reference`: our forced reference path (the upstream algorithm, S x S weights);
- `xla dpa`:   jax.nn.dot_product_attention(implementation="xla", is_causal=True),
               softmax, no RoPE (a peer for every activation);
- `cudnn dpa`: the same with implementation="cudnn" (GPU, fp16/bf16 only);
- `ours`:      eqx_xlstm.attention with the default implementation, and each forced
               path that can serve (`chunked`, `cudnn`, and `pallas` on a GPU).

All "ours" and "reference" rows include swish (with --pre swish) and RoPE. Time is the
median of --repeats jitted calls. TFLOP/s uses the nominal causal count
fwd = 2*B*H*S^2*D, fwd+bwd = 3.5x that, for every row (so the linear 'none' path shows
an effective rate). Memory is XLA's buffer plan for the compiled call (arguments,
outputs and temporaries). Ratios are this row's time over the peer's time.

    python benchmarks/attention_speed.py --batch 1 --heads 1 --head-dim 64 --seqs 1024,4096
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import eqx_xlstm as ex
from eqx_xlstm.implementations import CuDNN, Triton
from eqx_xlstm.spec import AttentionSpec, default_device

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--heads", type=int, default=1)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--seqs", default="1024,2048,4096")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--activations", default="softmax,sigmoid,none")
parser.add_argument("--passes", default="fwd,fwd+bwd")
parser.add_argument("--pre", default="none", choices=["none", "swish"])
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument(
    "--max-mem-gib", type=float, default=16.0, help="skip a call whose planned memory exceeds this"
)
parser.add_argument("--only", default="", help="comma list of row names to run")
parser.add_argument("--json", default="", help="also write the rows to this file")
args = parser.parse_args()

platform = jax.default_backend()
device = jax.devices()[0].device_kind
dtype = jnp.dtype(args.dtype)
B, H, D = args.batch, args.heads, args.head_dim


def timed(fn, inputs):
    """(median seconds, planned bytes) or a string saying why it did not run."""
    compiled_fn = jax.jit(fn)
    try:
        compiled = compiled_fn.lower(*inputs).compile()
    except Exception as err:  # noqa: BLE001 - report and go on
        return f"compile failed: {type(err).__name__}"
    mem = compiled.memory_analysis()
    planned = None
    if mem is not None:
        planned = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        if planned > args.max_mem_gib * 2**30:
            return f"skipped: plans {planned / 2**30:.1f} GiB"
    try:
        jax.block_until_ready(compiled(*inputs))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001
        return "out of memory" if "RESOURCE_EXHAUSTED" in str(err) else type(err).__name__
    return statistics.median(times), planned


def with_pass(forward, mode):
    if mode == "fwd":
        return forward
    # The loss value is returned too, as in a training step: with the gradients alone,
    # XLA would drop a forward kernel whose output the backward pass does not read
    # (sigmoid and 'none' recompute their weights), and time the backward pass only.
    loss = lambda *xs: jnp.sum(forward(*xs).astype(jnp.float32))  # noqa: E731
    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def ours(activation, implementation):
    return lambda q, k, v: ex.attention(  # noqa: E731
        q,
        k,
        v,
        activation_function=activation,
        qk_pre_activation_function=args.pre,
        implementation=implementation,
    )


def dpa(implementation):
    def fn(q, k, v):  # (B, S, H, D) layout, no RoPE
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    return fn


def serves(implementation, activation):
    platform, capability = default_device()
    spec = AttentionSpec(
        activation, "none", "causal", dtype, (B, H), 1024, D, D, 0.0, platform, capability
    )
    return implementation.unsupported(spec) is None


def can_cudnn(activation):
    return serves(CuDNN(), activation)


rows = []
keys = jax.random.split(jax.random.key(0), 3)
print(
    f"device: {device} ({platform}); B={B} NH={H} D={D} {dtype.name}, causal, "
    f"pre-activation {args.pre}; jax {jax.__version__}"
)
for seq in [int(s) for s in args.seqs.split(",")]:
    qkv = [jax.random.normal(key, (B, H, seq, D), dtype) for key in keys]
    qkv_bshd = [x.transpose(0, 2, 1, 3) for x in qkv]
    for mode in args.passes.split(","):
        flops = 2 * B * H * seq * seq * D * (1.0 if mode == "fwd" else 3.5)
        peers = {}
        entries = [("xla dpa", "softmax", dpa("xla"), qkv_bshd)]
        if can_cudnn("softmax"):
            entries.append(("cudnn dpa", "softmax", dpa("cudnn"), qkv_bshd))
        for activation in args.activations.split(","):
            entries.append(("reference", activation, ours(activation, "reference"), qkv))
            entries.append(("ours default", activation, ours(activation, None), qkv))
            entries.append(("ours chunked", activation, ours(activation, "chunked"), qkv))
            if can_cudnn(activation):
                entries.append(("ours cudnn", activation, ours(activation, "cudnn"), qkv))
            if platform == "gpu" and serves(Triton(), activation):
                entries.append(("ours pallas", activation, ours(activation, "pallas"), qkv))
        for name, activation, fn, inputs in entries:
            if args.only and name not in args.only.split(","):
                continue
            result = timed(with_pass(fn, mode), inputs)
            row = dict(
                seq=seq,
                mode=mode,
                name=name,
                activation=activation,
                device=device,
                dtype=dtype.name,
                B=B,
                H=H,
                D=D,
            )
            if isinstance(result, str):
                row["note"] = result
            else:
                row["ms"] = result[0] * 1e3
                row["tflops"] = flops / result[0] / 1e12
                row["mem_mib"] = None if result[1] is None else result[1] / 2**20
            if name in ("xla dpa", "cudnn dpa") or name == "reference":
                peers[(name, activation)] = row.get("ms")
            rows.append(row)
            done = f"{row['ms']:.2f} ms" if "ms" in row else row["note"]
            print(f"  S={seq} {mode} {activation} {name}: {done}", flush=True)

header = (
    f"{'S':>6} {'pass':>7} {'activation':>10} {'impl':>13} {'ms':>9} {'TFLOP/s':>8} "
    f"{'mem MiB':>9} {'/ref':>6} {'/xla':>6} {'/cudnn':>6}"
)
print(header)
print("-" * len(header))


def ratio(row, peer_name, peer_act):
    """This row's time over the peer's at the same S and pass, formatted."""
    peer = next(
        (
            r.get("ms")
            for r in rows
            if r["seq"] == row["seq"]
            and r["mode"] == row["mode"]
            and r["name"] == peer_name
            and r["activation"] == peer_act
        ),
        None,
    )
    return f"{row['ms'] / peer:6.2f}" if peer and "ms" in row else f"{'-':>6}"


for row in rows:
    if "ms" in row:
        mem = f"{row['mem_mib']:9.0f}" if row["mem_mib"] is not None else f"{'?':>9}"
        body = f"{row['ms']:9.2f} {row['tflops']:8.2f} {mem}"
    else:
        body = f"{row['note']:>28}"
    print(
        f"{row['seq']:>6} {row['mode']:>7} {row['activation']:>10} {row['name']:>13} "
        f"{body} {ratio(row, 'reference', row['activation'])} "
        f"{ratio(row, 'xla dpa', 'softmax')} {ratio(row, 'cudnn dpa', 'softmax')}"
    )
if args.json:
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=1)
