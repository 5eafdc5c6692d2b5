"""Context parallelism: causal attention fwd+bwd with the sequence sharded over all
visible devices, against one device, in one run.

    python benchmarks/context_parallel.py --seq-lens 65536 262144

For each activation and S: the median time of the gradient (value and gradient of a
sum) on one device with the default path (cuDNN for softmax, Mosaic kernels for
sigmoid, the linear form for 'none' on an H200) and with the path asked for on
sequence-sharded inputs (`--engine`; default cuDNN for softmax and the Mosaic kernels
for sigmoid, each ring's pieces being its own kernels; linear for 'none'), then that
path jitted on inputs sharded over the sequence across every device (automatic context
parallelism).
"speedup" is the one-device time of the same engine over the sharded time; "exposed"
estimates the time not hidden behind compute: sharded time minus the one-device time
divided by the device count; "max rel err" compares the sharded gradients with one
device's. `--window` and `--documents` add a sliding window or
packed documents to every row (each query's first key then goes round the ring).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from timing import median_ms, packed_ids, print_table_header, random_qkv, sum_gradient

import eqx_xlstm as ex

ENGINE = {"softmax": "cudnn", "sigmoid": "mosaic", "none": "linear"}


def gradient(activation, implementation, **features):
    def output(q, k, v):
        return ex.attention(
            q,
            k,
            v,
            activation_function=activation,
            qk_pre_activation_function="swish",
            implementation=implementation,
            **features,
        )

    return sum_gradient(output)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[65536])
    parser.add_argument("--activations", nargs="+", default=["softmax", "sigmoid", "none"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-default", action="store_true", help="no default-path column")
    parser.add_argument("--window", type=int, default=None, help="a sliding window")
    parser.add_argument(
        "--documents", type=int, default=None, help="packed documents of S / documents each"
    )
    parser.add_argument(
        "--engine",
        nargs="+",
        default=[],
        metavar="ACTIVATION=IMPLEMENTATION",
        help="the path per activation, e.g. softmax=chunked",
    )
    args = parser.parse_args()
    engines = {**ENGINE, **dict(item.split("=", 1) for item in args.engine)}

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("seq",))
    sharding = NamedSharding(mesh, PartitionSpec(None, None, "seq", None))
    print(
        f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}; bf16, B=1, "
        f"NH={args.heads}, D={args.head_dim}, swish, causal; fwd+bwd median ms"
        + (f"; window {args.window}" if args.window else "")
        + (f"; {args.documents} packed documents" if args.documents else "")
    )
    print_table_header(
        "| activation | S | one device, default path | path | one device, path | "
        f"{len(devices)} devices, sequence-sharded | speedup vs path | "
        "speedup vs default | exposed ms | max rel err |"
    )
    for seq_len in args.seq_lens:
        shape = (1, args.heads, seq_len, args.head_dim)
        one = [jax.device_put(x, devices[0]) for x in random_qkv(shape, jnp.bfloat16)]
        many = [jax.device_put(x, sharding) for x in one]
        features = {}
        if args.window:
            features["sliding_window"] = args.window
        if args.documents:
            features["segment_ids"] = packed_ids(seq_len, args.documents)
        for activation in args.activations:
            engine = engines[activation]
            t_default = (
                float("nan")
                if args.skip_default
                else median_ms(gradient(activation, None, **features), *one, repeats=args.repeats)
            )
            timed = gradient(activation, engine, **features)
            t_engine = median_ms(timed, *one, repeats=args.repeats)
            progress(f"{activation} S={seq_len}: one device, {engine}: {t_engine:.1f} ms")
            t_many = median_ms(timed, *many, repeats=args.repeats)
            exposed = t_many - t_engine / len(devices)
            error = max_rel_err(jax.jit(timed)(*many), jax.jit(timed)(*one))
            print(
                f"| {activation} | {seq_len} | {t_default:.1f} | {engine} | {t_engine:.1f} | "
                f"{t_many:.1f} | {t_engine / t_many:.2f} | {t_default / t_many:.2f} | "
                f"{exposed:.1f} | {error:.1e} |",
                flush=True,
            )


def max_rel_err(got, want):
    """The largest of each gradient's max |got - want| over max |want|."""
    errors = []
    for a, b in zip(got, want, strict=True):
        a, b = (np.asarray(jax.device_get(x), np.float32) for x in (a, b))
        errors.append(np.abs(a - b).max() / np.abs(b).max())
    return max(errors)


def progress(text):
    """A line for whoever watches a long run (the table rows come at each row's end)."""
    print(f"# {time.strftime('%H:%M:%S')} {text}", flush=True)


if __name__ == "__main__":
    main()
