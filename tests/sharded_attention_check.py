"""Run by tests/test_sharding.py in a process with 4 CPU host devices: attention and its
gradient under `jax.jit` on inputs sharded over the batch or the heads axis. Prints one
JSON line per case: the collectives in the compiled HLO, the output and gradient
shardings, and the largest difference from the unsharded result."""

import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_xlstm as ex

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
CASES = [  # (implementation, activation): each path once
    ("reference", "softmax"),
    ("chunked", "sigmoid"),
    ("linear", "none"),
    ("triton", "softmax"),  # Pallas interpret mode on a CPU
    ("triton", "sigmoid"),
]


def attention(implementation, activation, vmap_heads):
    def f(q, k, v):
        call = lambda q, k, v: ex.attention(
            q, k, v, activation_function=activation, implementation=implementation
        )
        return (
            eqx.filter_vmap(call, in_axes=1, out_axes=1)(q, k, v) if vmap_heads else call(q, k, v)
        )

    return f


def main():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (4, 4, 160, 16)) for key in keys)  # (B, H, S, D)
    for (implementation, activation), vmap_heads in [(case, False) for case in CASES] + [
        (CASES[1], True)
    ]:
        f = attention(implementation, activation, vmap_heads)
        grad = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
        want = [jax.jit(f)(q, k, v), *jax.jit(grad)(q, k, v)]
        for axis_name, spec in (("batch", PartitionSpec("x")), ("heads", PartitionSpec(None, "x"))):
            sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
            got = [jax.jit(f)(*sharded), *jax.jit(grad)(*sharded)]
            hlo = "".join(jax.jit(fn).lower(*sharded).compile().as_text() for fn in (f, grad))
            print(
                json.dumps(
                    {
                        "case": f"{implementation}-{activation}" + ("-vmap" if vmap_heads else ""),
                        "sharded": axis_name,
                        "collectives": {
                            c: n for c in COLLECTIVES if (n := len(re.findall(c, hlo)))
                        },
                        "shardings": sorted({str(x.sharding.spec) for x in got}),
                        "expected": str(spec),
                        "max_rel_err": max(
                            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                            for a, b in zip(got, want)
                        ),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
