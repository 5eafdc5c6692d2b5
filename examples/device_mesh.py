"""The examples' device mesh: `--mesh data=D,model=M,seq=S` parsed, built, and used to
place the training state and the batches."""

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_xlstm as ex

AXES = ("data", "model", "seq")
"""Batch (data parallelism, and FSDP for the parameters), heads (tensor parallelism),
sequence (context parallelism)."""


def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,model=2"` -> `{"data": 2, "model": 2, "seq": 1}`; a ValueError saying
    what is wrong."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in AXES:
            raise ValueError(
                f"--mesh {text!r}: each part must be AXIS=SIZE with AXIS one of " + ", ".join(AXES)
            )
        if name in seen:
            raise ValueError(f"--mesh {text!r} names {name!r} twice")
        seen.add(name)
        try:
            sizes[name] = int(value)
        except ValueError:
            sizes[name] = 0
        if sizes[name] < 1:
            raise ValueError(f"--mesh {text!r}: the size of {name!r} must be an int >= 1")
    return sizes


def describe(sizes: dict[str, int]) -> str:
    return ",".join(f"{name}={sizes[name]}" for name in AXES)


def build_mesh(sizes: dict[str, int]) -> Mesh:
    count = int(np.prod([sizes[name] for name in AXES]))
    grid = np.array(jax.devices()[:count]).reshape([sizes[name] for name in AXES])
    return Mesh(grid, AXES)


def shardings_of(tree, mesh: Mesh, fsdp: bool = True):
    """NamedShardings for the model parameters `tree` (`ex.partition_specs`; without
    `fsdp` they are not split over `data`)."""
    specs = ex.partition_specs(tree, mesh, model_axis="model", data_axis="data" if fsdp else None)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """`(batch, length)` arrays: the batch over `data`, the positions over `seq`."""
    return NamedSharding(mesh, PartitionSpec("data", "seq"))


def like_params(opt_state, param_shardings, mesh: Mesh):
    """Shardings for `opt_state`: a leaf whose path ends with a parameter's path (Adam's
    moments of that parameter) is placed like it, every other leaf replicated."""
    by_path = dict(jax.tree_util.tree_leaves_with_path(param_shardings))
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        if not eqx.is_array(leaf):
            return None
        for start in range(len(path)):
            if path[start:] in by_path:
                return by_path[path[start:]]
        return replicated

    return jax.tree_util.tree_map_with_path(place, opt_state)
