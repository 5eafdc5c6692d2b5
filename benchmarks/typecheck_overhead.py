"""Does runtime type checking cost anything in a jitted call?

Type checks run while JAX traces, so after the first (compiling) call a jitted
function should cost the same with checking on and off. Prints a table.

    python benchmarks/typecheck_overhead.py [--seq 512] [--repeats 200]
"""

import argparse
import statistics
import time

import equinox as eqx
import jax

import eqx_xlstm as ex

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seq", type=int, default=512)
parser.add_argument("--heads", type=int, default=4)
parser.add_argument("--head-dim", type=int, default=64)
parser.add_argument("--repeats", type=int, default=200)
args = parser.parse_args()

shape = (1, args.heads, args.seq, args.head_dim)
q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
backend = ex.mLSTMBackendAttention(
    ex.mLSTMBackendAttentionConfig(context_length=args.seq), qk_head_dim=args.head_dim
)


def measure(checking: bool):
    ex.set_typechecking(checking)
    fn = eqx.filter_jit(lambda b, q, k, v: b(q, k, v))  # a fresh jit: traced anew
    start = time.perf_counter()
    fn(backend, q, k, v).block_until_ready()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn(backend, q, k, v).block_until_ready()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), min(times)


results = {}
for checking in (False, True, False, True):  # interleaved, second round kept
    results[checking] = measure(checking)
ex.set_typechecking(True)

print(
    f"device: {jax.devices()[0].device_kind}; q/k/v {shape} float32; "
    f"{args.repeats} calls per setting"
)
print(f"{'checking':>9} | {'first call ms':>13} | {'median ms':>9} | {'min ms':>7}")
for checking in (False, True):
    first, median, best = results[checking]
    print(
        f"{'on' if checking else 'off':>9} | {first * 1e3:13.1f} | {median * 1e3:9.3f} | "
        f"{best * 1e3:7.3f}"
    )
ratio = results[True][1] / results[False][1]
print(f"median jitted call, on / off: {ratio:.3f}x")
