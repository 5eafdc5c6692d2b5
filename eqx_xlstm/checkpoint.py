"""Checkpoints through orbax-checkpoint, verified when read.

A checkpoint is a folder that orbax finalises atomically (written under a temporary
name, renamed when complete), holding two items:

- ``arrays``: the array leaves of a pytree in orbax's standard format; sharded arrays
  are written and read shard by shard, on any number of devices and hosts;
- ``header``: JSON with the caller's metadata, each array leaf's path, shape, dtype and
  checksum, and a SHA-256 digest of the rest of the header.

Reading recomputes the digest and every checksum, so a truncated, emptied, edited or
bit-flipped checkpoint raises `CheckpointError` naming the folder instead of loading.
The checksums are computed where the arrays live (two position-weighted sums of their
raw bits; any single flipped bit changes both), so no array is gathered to one host.

`save_checkpoint` / `load_checkpoint` read and write one folder; `checkpoint_args` is
the same content as the `args` of an `orbax.checkpoint.CheckpointManager.save`, for
periodic saves, keep-last-N and async writes (as the example training loop does).
"""

import contextlib
import gc
import hashlib
import json
import os
import pathlib
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

FORMAT = "eqx_xlstm.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, fails verification or holds other arrays."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = pathlib.Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path} is unusable: {reason}")


def _ocp():
    # Imported on first use: orbax takes about a second to import.
    import orbax.checkpoint as ocp

    return ocp


def _is_stored(leaf: Any) -> bool:
    """Whether a checkpoint stores `leaf`: jax or NumPy arrays, or their shapes
    (`jax.ShapeDtypeStruct` in a `like`)."""
    return eqx.is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def _array_leaves(tree: PyTree) -> tuple[list[str], list[Any]]:
    """The paths and values of `tree`'s array leaves (jax or NumPy arrays, or
    `jax.ShapeDtypeStruct`s), in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    kept = [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves if _is_stored(leaf)]
    return [path for path, _ in kept], [leaf for _, leaf in kept]


def _raw_bits(x: jax.Array) -> jax.Array:
    """The bits of `x`, flattened, one uint32 per 8/16/32 bits, two per 64."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    width = x.dtype.itemsize
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    sums = []
    for x in leaves:
        bits = _raw_bits(x)
        index = jax.lax.iota(jnp.uint32, bits.size)
        odd = index * jnp.uint32(0x9E3779B1) * jnp.uint32(2) + jnp.uint32(1)
        mixed = bits ^ (index * jnp.uint32(0x85EBCA77))
        sums.append(
            jnp.stack([jnp.sum(bits * odd, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])
        )
    return sums


def _checksum_strings(leaves: list[Any]) -> list[str]:
    sums = jax.device_get(_checksums([jnp.asarray(x) for x in leaves]))
    return [f"{int(a):08x}{int(b):08x}" for a, b in sums]


def _digest(header: dict[str, Any]) -> str:
    body = {key: value for key, value in header.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def checkpoint_args(tree: PyTree, metadata: dict[str, Any]):
    """The `orbax.checkpoint.args.Composite` that saves `tree`'s array leaves and
    `metadata` (JSON, finite numbers only) as a checkpoint `load_checkpoint` verifies:
    pass it as `args=` to `CheckpointManager.save` or `Checkpointer.save`."""
    try:
        # A snapshot: an async save writes later, when the caller's lists may have grown.
        metadata = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`metadata` must be JSON with finite numbers: {err}") from None
    paths, leaves = _array_leaves(tree)
    header = {
        "format": FORMAT,
        "metadata": metadata,
        "leaves": [
            {"path": path, "shape": list(leaf.shape), "dtype": str(leaf.dtype), "checksum": c}
            for path, leaf, c in zip(paths, leaves, _checksum_strings(leaves))
        ],
    }
    header["digest"] = _digest(header)
    ocp = _ocp()
    arrays = {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}
    return ocp.args.Composite(
        arrays=ocp.args.StandardSave(arrays), header=ocp.args.JsonSave(header)
    )


def save_checkpoint(path: str | os.PathLike, tree: PyTree, metadata: dict[str, Any]) -> None:
    """Write `tree`'s array leaves and `metadata` as a checkpoint folder at `path`,
    replacing one that is there; orbax renames it into place only when complete."""
    ocp = _ocp()
    path = pathlib.Path(path).absolute()
    args = checkpoint_args(tree, metadata)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(path, args=args, force=True)


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause of `err` (orbax wraps tensorstore's
    specific message in a generic one), at most 200 characters."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def _quiet_cleanup():
    """When one read fails, orbax abandons its other read coroutines, which then report
    their cancellation as "Exception ignored in ..." tracebacks once collected: collect
    them here, keeping those reports off stderr (others pass through)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        from_orbax = code is not None and "orbax" in code.co_filename
        closed_loop = "Event loop is closed" in str(unraisable.exc_value)
        if not (from_orbax or closed_loop):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _read(path: pathlib.Path, **items):
    ocp = _ocp()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, args=ocp.args.Composite(**items))


def _header(path: str | os.PathLike) -> tuple[pathlib.Path, dict[str, Any]]:
    path = pathlib.Path(path).absolute()
    if path.is_file():
        raise CheckpointError(path, "it is a file, not a checkpoint folder")
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    try:
        header = _read(path, header=_ocp().args.JsonRestore())["header"]
    except Exception as err:  # orbax and tensorstore raise many kinds
        raise CheckpointError(path, f"its header cannot be read ({_first_line(err)})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(path, f"its header is not an {FORMAT} header")
    if header.get("digest") != _digest(header):
        raise CheckpointError(path, "its header was changed after saving (digest mismatch)")
    return path, header


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved with the checkpoint at `path`, its header verified;
    a FileNotFoundError if there is none, a `CheckpointError` if it is damaged."""
    return _header(path)[1]["metadata"]


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def load_checkpoint(path: str | os.PathLike, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Read the checkpoint at `path` into the structure of `like`; returns
    `(tree, metadata)`.

    `like`'s array leaves (arrays or `jax.ShapeDtypeStruct`s, e.g. from
    `eqx.filter_eval_shape`) give each stored array's shape, dtype and sharding; its
    other leaves are kept. Every array is checked against its checksum: a damaged
    checkpoint, or one holding other arrays than `like`, is a `CheckpointError`.
    """
    path, header = _header(path)
    paths, leaves = _array_leaves(like)
    stored = header["leaves"]
    if len(stored) != len(leaves):
        raise CheckpointError(path, f"it holds {len(stored)} arrays where `like` has {len(leaves)}")
    for name, leaf, entry in zip(paths, leaves, stored):
        if entry["shape"] != list(leaf.shape) or entry["dtype"] != str(leaf.dtype):
            raise CheckpointError(
                path,
                f"array {name or '(root)'} is {entry['dtype']}{entry['shape']} there, "
                f"{leaf.dtype}{list(leaf.shape)} in `like`",
            )
    ocp = _ocp()
    target = {f"{i:06d}": _abstract(leaf) for i, leaf in enumerate(leaves)}
    failure = None
    with _quiet_cleanup():
        try:
            arrays = _read(path, arrays=ocp.args.StandardRestore(target))["arrays"]
            restored = [arrays[key] for key in sorted(target)]
        except Exception as err:  # orbax and tensorstore raise many kinds
            failure = _first_line(err)
    if failure is not None:
        raise CheckpointError(path, f"its arrays cannot be read ({failure})")
    for name, entry, checksum in zip(paths, stored, _checksum_strings(restored)):
        if checksum != entry["checksum"]:
            raise CheckpointError(
                path, f"array {name or '(root)'} does not match its checksum (damaged data)"
            )
    restored = [
        np.asarray(value) if isinstance(leaf, np.ndarray) else value
        for leaf, value in zip(leaves, restored)
    ]
    tree = _replace_array_leaves(like, restored)
    return tree, header["metadata"]


def _replace_array_leaves(like: PyTree, values: list[Any]) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    values = iter(values)
    leaves = [next(values) if _is_stored(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)
