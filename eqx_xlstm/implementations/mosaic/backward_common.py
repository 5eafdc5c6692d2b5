"""What the Mosaic GPU backward kernels (`backward.py`'s dK/dV, `dq_kernel.py`'s dQ) share:
their tile sizes, matmul helpers, the per-block entries they read from XLA
(`block_info`), the bounded kernels' shared memory, and how their settings and trailing
inputs are laid out."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .common import check_options

ROWS = 64  # keys per compute warpgroup and query rows per streamed tile
STAGES = 2  # streamed-tile slots: dK/dV measured slower with more; dQ fits only 2 at D=128


def matmul(a, b, shape):
    """a @ b on the tensor cores into a fresh float32 accumulator, waited for."""
    return matmuls((a, b), shape=shape)[0]


def matmuls(*pairs, shape):
    """Each (a, b) of `pairs`: a @ b, all issued before the first is waited for."""

    def run(*accs):
        for acc, (a, b) in zip(accs, pairs, strict=True):
            plgpu.wgmma(acc, a, b)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(run, *(plgpu.ACC(shape, jnp.float32) for _ in pairs))


# int32 entries a dK/dV block reads from `block_info`: 128 bytes, as a TMA copy's shared
# memory destination must be aligned to (fewer entries are padded).
BLOCK_INFO = 32


def block_info(*entries):
    """Two `entries` (each `(N, blocks)`) as the `(N, blocks, BLOCK_INFO)` int32 array
    that `read_block_info` reads."""
    info = jnp.stack(entries, axis=-1).astype(jnp.int32)
    return jnp.pad(info, ((0, 0), (0, 0), (0, BLOCK_INFO - len(entries))))


def read_block_info(info, smem, bar):
    """A block's two entries of `block_info`: `info` (`(BLOCK_INFO,)` in global memory)
    copied into `smem` (waited on `bar`) and read there as scalars. (Scalar reads
    straight from global memory hang Mosaic GPU interpret mode.)"""
    plgpu.copy_gmem_to_smem(info, smem, bar)
    plgpu.barrier_wait(bar)
    return smem[0], smem[1]


def bounded_scratch(tiles):
    """A bounded kernel's first keys (`tiles` tiles of `ROWS`) and three warpgroups'
    `block_info` entries in one int32 buffer (Pallas aligns each scratch buffer to 1
    KiB: two cost a KiB more), and the entries' barriers. The first keys' copies wait
    on the caller's barriers."""
    return [
        plgpu.SMEM((tiles * ROWS + 3 * BLOCK_INFO,), jnp.int32),
        plgpu.Barrier(num_barriers=3),
    ]


def bounded_views(buffer, tiles):
    """`bounded_scratch`'s buffer as two functions of an index i: tile i's first keys
    and warpgroup i's `block_info` entry."""

    def first_keys(i):
        return buffer.at[pl.ds(i * ROWS, ROWS)]

    def info(i):
        return buffer.at[pl.ds(tiles * ROWS + i * BLOCK_INFO, BLOCK_INFO)]

    return first_keys, info


def row_stats(activation, lse, delta):
    """Softmax's row statistics as the kernels read them: `(N, 2, S)` float32, lse
    then delta (one copy a tile); nothing for sigmoid and 'none'."""
    if activation != "softmax":
        return ()
    if lse is None or delta is None:
        raise ValueError("softmax's backward needs each row's lse and delta")
    # The barrier keeps delta's row reduction (sum(dO * O)) a fusion of its own: fused
    # into the stack, XLA ran it at under half the memory bandwidth (docs/benchmarks.md).
    delta = jax.lax.optimization_barrier(delta)
    return (jnp.stack([lse, delta], axis=1).astype(jnp.float32),)


def kernel_options(
    activation, bias, interpret, full, groups, first_key, prepared, ctas, window=None
):
    """The keyword settings `_dq` and `_dkv` share, checked."""
    check_options(full, first_key, ctas, window)
    return dict(
        ctas=ctas,
        window=window,
        activation=activation,
        bias=bias,
        interpret=interpret,
        full=full,
        groups=groups,
        n_first=first_key is not None,
        swish=bool(prepared and prepared.swish),
    )


def split_extras(rest, activation, n_first):
    """A backward kernel's trailing inputs: `(first_key, stats, raw)`, each a tuple
    (`mosaic_dkv` lists them)."""
    n_stats = activation == "softmax"
    return rest[:n_first], rest[n_first : n_first + n_stats], rest[n_first + n_stats :]


def table_every(n, raw, groups):
    """How many consecutive query rows read each row of the RoPE table (`Prepared`):
    a K/V row's group of query rows must share one."""
    if not raw:
        return 1
    tables = raw[-1].shape[0]
    if n % tables or (n // tables) % groups:
        raise ValueError(
            f"prepared.table has {tables} rows, which do not divide {n} query rows in "
            f"groups of {groups}"
        )
    return n // tables


def bound_kernel(kernel, q, first_key, raw, options, **own):
    """`kernel` (`_kernel` or `_dq_kernel`) with the settings both take, derived alike
    from `kernel_options` and the inputs (`first_key`, `raw`: `split_extras`'), and `own`,
    its own."""
    n, _, dim = q.shape
    return functools.partial(
        kernel,
        activation=options["activation"],
        bias=options["bias"],
        scale=dim**-0.5,
        full=options["full"],
        interpret=options["interpret"],
        keyed=bool(first_key),
        window=options["window"],
        groups=options["groups"],
        to_raw=bool(raw),
        swish=options["swish"],
        every=table_every(n, raw, options["groups"]),
        n_ctas=options["ctas"],
        **own,
    )


def scratch_flags(first_key, stats, raw, interpret):
    """What `_dkv_scratch` and `_dq_scratch` take from the inputs (`split_extras`')."""
    return dict(keyed=bool(first_key), softmax=bool(stats), raw=bool(raw), interpret=interpret)
