"""Run by tests/test_sharding.py in a process with 4 CPU host devices: attention and its
gradient under `jax.jit` on inputs sharded over the batch or the heads axis, and
decoding from a prompt's state. Prints one JSON line per case: the collectives in the
compiled HLO, the shardings of the results (outputs, gradients, states), and the largest
difference from the unsharded result."""

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


def compiled_run(fn, *args):
    """`fn(*args)` compiled once (`jax.jit`): its outputs and the compiled HLO's text."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled(*args), compiled.as_text()


def value_and_grads(f):
    """`f`'s value followed by the gradients of `sum(f**2)` w.r.t. its first three
    arguments, as one function (one program to compile)."""
    grad = jax.grad(lambda q, k, v, *rest: jnp.sum(f(q, k, v, *rest) ** 2), argnums=(0, 1, 2))
    return lambda *args: [f(*args), *grad(*args)]


def attention(implementation, activation, vmap_heads):
    def f(q, k, v):
        call = lambda q, k, v: ex.attention(
            q, k, v, activation_function=activation, implementation=implementation
        )
        return (
            eqx.filter_vmap(call, in_axes=1, out_axes=1)(q, k, v) if vmap_heads else call(q, k, v)
        )

    return f


def main(mesh):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (4, 4, 160, 16)) for key in keys)  # (B, H, S, D)
    for (implementation, activation), vmap_heads in [(case, False) for case in CASES] + [
        (CASES[1], True)
    ]:
        both = value_and_grads(attention(implementation, activation, vmap_heads))
        want = jax.jit(both)(q, k, v)
        for axis_name, spec in (("batch", PartitionSpec("x")), ("heads", PartitionSpec(None, "x"))):
            sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
            got, hlo = compiled_run(both, *sharded)
            report(
                f"{implementation}-{activation}" + ("-vmap" if vmap_heads else ""),
                axis_name,
                hlo,
                got,
                spec,
                got,
                want,
            )


def decoding_cases(mesh):
    """A prompt's state, then 4 decoded positions, for a KV cache and a linear state."""
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (4, 4, 24, 16)) for key in keys)
    for activation in ("softmax", "none"):
        config = ex.mLSTMBackendAttentionConfig(context_length=64, activation_function=activation)
        backend = ex.mLSTMBackendAttention(config, qk_head_dim=16)

        def decode(q, k, v, backend=backend):
            _, state = backend(
                q[..., :20, :], k[..., :20, :], v[..., :20, :], return_last_states=True
            )
            tail = (x[..., 20:, :] for x in (q, k, v))
            return backend(*tail, return_last_states=True, state=state)

        h_want, _ = eqx.filter_jit(decode)(q, k, v)
        for axis_name, spec in (("batch", PartitionSpec("x")), ("heads", PartitionSpec(None, "x"))):
            sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
            (h, state), hlo = compiled_run(decode, *sharded)
            arrays = [h, *(x for x in jax.tree.leaves(state) if isinstance(x, jax.Array))]
            report(f"decode-{activation}", axis_name, hlo, arrays, spec, [h], [h_want])


def bounded_cases(mesh):
    """Packed sequences with a window, and grouped-query heads: shard-local too (the
    ids sharded like the batch, or replicated when the heads are sharded)."""
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (4, 4, 160, 16)) for key in keys)
    ids = jnp.sort(jax.random.randint(jax.random.key(4), (4, 1, 160), 0, 6), axis=-1)
    cases = [  # (label, implementation, activation, kwargs, kv heads, shardings)
        ("bounded-chunked-sigmoid", "chunked", "sigmoid", {"sliding_window": 40}, 4, 2),
        ("bounded-linear-none", "linear", "none", {}, 4, 2),
        ("bounded-chunked-softmax-grouped", "chunked", "softmax", {}, 2, 1),
        (  # the kernels' first keys, shared K/V and per-row bias as per_shard operands
            "bounded-triton-sigmoid-grouped-bias",
            ex.implementations.Triton(forward=(16, 32, 4, 1), backward=(32, 16, 4, 1)),
            "sigmoid",
            {"sliding_window": 40, "sigmoid_bias": jnp.linspace(-3.0, -1.0, 4)},
            2,
            1,
        ),
    ]
    for label, implementation, activation, kwargs, kv_heads, ways in cases:

        def f(q, k, v, ids, implementation=implementation, activation=activation, kw=kwargs):
            return ex.attention(
                q,
                k,
                v,
                activation_function=activation,
                implementation=implementation,
                segment_ids=ids,
                **kw,
            )

        both = value_and_grads(f)
        kk, vv = k[:, :kv_heads], v[:, :kv_heads]
        want = jax.jit(both)(q, kk, vv, ids)
        shardings = (
            ("batch", PartitionSpec("x"), PartitionSpec("x")),
            ("heads", PartitionSpec(None, "x"), PartitionSpec()),
        )[:ways]
        for axis_name, spec, id_spec in shardings:
            sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, kk, vv)]
            sharded.append(jax.device_put(ids, NamedSharding(mesh, id_spec)))
            got, hlo = compiled_run(both, *sharded)
            report(label, axis_name, hlo, got, spec, got, want)


def shared_array_cases(mesh):
    """`per_shard` with an array shared by every shard (no leading axes, like the RoPE
    table the Mosaic backward takes): over the batch each device gets it whole, over
    the sequence its own part, next to its shard of the others."""
    from eqx_xlstm.implementations.per_shard import per_shard

    x = jax.random.normal(jax.random.key(5), (4, 4, 64, 8))
    scaled = lambda x, table: (x * table,)
    cases = (  # (sharded axis, table's leading axes: one for all, or one per batch row)
        ("batch", PartitionSpec("x"), None, (1, 1)),
        ("batch", PartitionSpec("x"), None, (4, 1)),
        ("heads", PartitionSpec(None, "x"), None, (4, 1)),
        ("sequence", PartitionSpec(None, None, "x"), lambda layout: scaled, (4, 1)),
    )
    for axis_name, spec, over_sequence, lead in cases:
        table = jax.random.normal(jax.random.key(6), (*lead, 64, 8))

        def f(x, table, over_sequence=over_sequence):
            options = dict(batch_ndim=2, over_sequence=over_sequence, shared=1)
            return per_shard(scaled, x, table, **options)[0]

        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        got, hlo = compiled_run(f, sharded, table)
        report("shared-table", axis_name, hlo, [got], spec, [got], [x * table])


def prepare_pass_cases(mesh):
    """The swish + RoPE kernel (`prepare_pass`, Pallas interpret mode here) and its
    gradient's kernel through `prepare_pass.differentiable_prepared`, on bf16 rows sharded
    over the batch, the heads or the sequence: each device runs them on its shard, with
    its part of the tables."""
    from eqx_xlstm.implementations import prepare_pass

    threshold, prepare_pass.TABLE_BYTES_FROM = prepare_pass.TABLE_BYTES_FROM, 0  # this size
    x, d_out = (
        jax.random.normal(jax.random.key(seed), (4, 4, 128, 32)).astype(jnp.bfloat16)
        for seed in (7, 8)
    )
    sin, cos = (t[None, None] for t in ex.precompute_freqs(32, 128))
    want = [  # one device
        prepare_pass.prepare_rows(x, "swish", sin, cos),
        prepare_pass.prepare_rows_gradient(x, d_out, "swish", sin, cos),
    ]

    def f(x, d_out):
        prepare = lambda x: prepare_pass.differentiable_prepared(x, "swish", sin, cos, 2, 0)
        out, pull_back = jax.vjp(prepare, x)
        return [out, *pull_back(d_out)]

    for axis_name, spec in (
        ("batch", PartitionSpec("x")),
        ("heads", PartitionSpec(None, "x")),
        ("sequence", PartitionSpec(None, None, "x")),
    ):
        sharded = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, d_out))
        got, hlo = compiled_run(f, *sharded)
        compared = [a.astype(jnp.float32) for a in got]
        report(
            "prepare-pass",
            axis_name,
            hlo,
            got,
            spec,
            compared,
            [w.astype(jnp.float32) for w in want],
        )
    prepare_pass.TABLE_BYTES_FROM = threshold


def report(case, axis_name, hlo, got, spec, compared, want):
    print(
        json.dumps(
            {
                "case": case,
                "sharded": axis_name,
                "collectives": {c: n for c in COLLECTIVES if (n := len(re.findall(c, hlo)))},
                "shardings": sorted({str(x.sharding.spec) for x in got}),
                "expected": str(spec),
                "max_rel_err": max(
                    float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(compared, want)
                ),
            }
        ),
        flush=True,
    )


def checkpoint_case(mesh):
    """Arrays sharded over batch and over heads through save_checkpoint/load_checkpoint:
    the checksums are computed where the shards live, and the arrays come back with the
    sharding of `like`."""
    import tempfile

    x = jax.random.normal(jax.random.key(2), (4, 4, 8, 16))
    tree = {
        "batch": jax.device_put(x, NamedSharding(mesh, PartitionSpec("x"))),
        "heads": jax.device_put(x * 2, NamedSharding(mesh, PartitionSpec(None, "x"))),
    }
    with tempfile.TemporaryDirectory() as folder:
        ex.save_checkpoint(f"{folder}/ckpt", tree, {"step": 1})
        like = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
        )
        restored, _ = ex.load_checkpoint(f"{folder}/ckpt", like)
    for name, array in restored.items():
        print(
            json.dumps(
                {
                    "case": f"checkpoint-{name}",
                    "sharding": str(array.sharding.spec),
                    "expected": str(tree[name].sharding.spec),
                    "equal": bool(jnp.all(array == tree[name])),
                }
            ),
            flush=True,
        )


def model_parallel_case():
    """A language model on a 2 x 2 mesh placed by `ex.partition_specs`: loss and
    gradients equal one device's, the attention inputs are sharded over heads (no
    collective around attention: only the projections' reductions and FSDP's gathers),
    and a decoding state comes out sharded over heads."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    config = ex.ModelConfig(vocab_size=64, context_length=32, embedding_dim=32, num_heads=4)
    model = ex.LanguageModel(config, key=jax.random.key(0))
    params, static = eqx.partition(model, ex.trainable_filter(model))
    tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 64)

    def loss(params, tokens):
        logits = jax.vmap(eqx.combine(params, static))(tokens)
        picked = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    want = value_and_grad(params, tokens)
    specs = ex.partition_specs(params, mesh)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    placed = eqx.filter_shard(params, shardings)
    batch = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("data")))
    got = value_and_grad(placed, batch)
    errors = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
            eqx.filter(got, eqx.is_array),
            eqx.filter(want, eqx.is_array),
        )
    )
    mixer = specs.blocks[0].mixer
    _, state = eqx.filter_jit(lambda m, t: m.decode(t))(eqx.combine(placed, static), batch[0, :8])
    report_row = {
        "case": "model-parallel",
        "max_rel_err": max(errors),
        "q_proj": str(mixer.q_proj.weight),
        "out_proj": str(mixer.out_proj.weight),
        "ffn_up": str(specs.blocks[0].ffn_up.weight),
        "head": str(specs.head.weight),
        "embedding": str(specs.embedding.weight),
        "state_shardings": sorted(
            {str(x.sharding.spec) for x in jax.tree.leaves(state) if isinstance(x, jax.Array)}
        ),
    }
    print(json.dumps(report_row), flush=True)


if __name__ == "__main__":
    mesh = Mesh(np.array(jax.devices()), ("x",))
    main(mesh)
    shared_array_cases(mesh)
    prepare_pass_cases(mesh)
    bounded_cases(mesh)
    decoding_cases(mesh)
    checkpoint_case(mesh)
    model_parallel_case()
