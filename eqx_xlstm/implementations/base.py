"""What an attention implementation is: a frozen, hashable object (its fields are its
tuning) that says whether it can serve a call and then runs it."""

import abc
import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class Implementation(abc.ABC):
    """The protocol every implementation follows.

    Instances are frozen dataclasses whose fields are tuning settings with measured
    defaults; dispatch passes them to `jax.jit` as static arguments, so a changed
    setting compiles anew instead of reusing stale code.
    """

    name: ClassVar[str]
    """The name `attention(..., implementation=name)` selects it by."""
    takes_bias: ClassVar[bool] = False
    """Whether it takes an array sigmoid bias (`spec.array_bias`) as `bias=`, q's batch
    shape, and differentiates it; otherwise dispatch hands it over as one more feature
    of q and k."""
    reads_inputs_dtype: ClassVar[bool] = False
    """Whether it rounds q and k to `spec.dtype` before using them (the GPU kernels), so
    that dispatch may hand them over in that dtype, from the swish + RoPE pass of
    `prepare_pass` where it serves, instead of in `spec.accum_dtype`."""

    @abc.abstractmethod
    def unsupported(self, spec: AttentionSpec) -> str | None:
        """Why this implementation cannot serve `spec`, or None if it can. The reason
        completes the sentence "implementation=... cannot serve these inputs: ..."."""

    @abc.abstractmethod
    def __call__(
        self,
        q: Float[Array, "*batch seq dqk"],
        k: Float[Array, "*batch seq dqk"],
        v: Float[Array, "*batch seq dv"],
        spec: AttentionSpec,
        mask: Bool[Array, "seq seq"] | None,
        first_key: Int[Array, "*#batch seq"] | None = None,
    ) -> Float[Array, "*batch seq dv"]:
        """The attention output for queries and keys already through swish and RoPE
        (in `spec.accum_dtype`) and values in `spec.dtype`; `mask` is the explicit
        mask (None when `spec.mask == "causal"`); `first_key`, when `spec.bounded`,
        each query's first visible key (`maths.first_keys`). With `spec.kv_groups > 1`
        k and v have a 1 where q has the group axis (-3). Any float dtype may come
        back: the caller casts to `spec.dtype`. Differentiable with respect to q, k
        and v."""

    def takes_raw(self, spec: AttentionSpec) -> bool:
        """Whether it takes calls of `spec` with `rope=(sin, cos)` (`(..., S, D/2)`
        each, of q's rank) and queries and keys as they come, before swish and RoPE,
        applying them itself (so that its backward can return the raw rows' gradients
        without a pass of its own). Dispatch hands it raw rows where no bias is a
        feature of q and k and the tables vary along leading batch axes only."""
        return False

    def ring_pieces(self) -> Any:
        """The pieces (forward and backward of a causal or full chunk pair, with their
        log-sum-exp) context parallelism runs in for this implementation: its own
        kernels where it has such pieces; None for the blockwise XLA ones."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The name and tuning fields, JSON-serialisable (see `from_dict`)."""
        return {"name": self.name, **dataclasses.asdict(self)}


SEGMENTS, WINDOW, GROUPED, ARRAY_BIAS = (
    "segment_ids",
    "sliding_window",
    "grouped-query heads",
    "an array sigmoid_bias",
)


def untaken_features(spec: AttentionSpec, takes: tuple[str, ...] = ()) -> str | None:
    """The reason an implementation gives for a spec with features it does not take
    (of `SEGMENTS`, `WINDOW`, `GROUPED`, `ARRAY_BIAS`; it takes those in `takes`),
    naming them; None if the spec has no other."""
    present = {
        SEGMENTS: spec.segmented,
        WINDOW: spec.window is not None,
        GROUPED: spec.kv_groups > 1,
        ARRAY_BIAS: spec.array_bias,
    }
    missing = [name for name, on in present.items() if on and name not in takes]
    return f"it does not take {' or '.join(missing)} yet" if missing else None


def as_rows(x: Array, spec: AttentionSpec, multiple: int) -> Array:
    """`(*batch, S, D)` -> `(N, S', D)` in `spec.dtype`, the sequence zero-padded at the
    end to `S'`, the next multiple of `multiple`: the layout the kernels take."""
    seq_len = spec.seq_len
    padded = -(-seq_len // multiple) * multiple
    x = x.astype(spec.dtype).reshape(-1, seq_len, x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, padded - seq_len), (0, 0)))


def from_rows(x: Array, batch_shape: tuple[int, ...], spec: AttentionSpec) -> Array:
    """`(N, S', D)` from `as_rows`' layout back to `(*batch_shape, S, D)`."""
    return x[:, : spec.seq_len].reshape(*batch_shape, spec.seq_len, x.shape[-1])


def in_blocks(x: Array, block: int) -> Array:
    """`(*batch, S, D)` -> `(*batch, nb, block, D)`, the sequence zero-padded at the end.
    The leading axes stay separate (never merged by a reshape), so that inputs sharded
    over any of them partition without gathering."""
    *batch, seq_len, dim = x.shape
    n_blocks = -(-seq_len // block)
    x = jnp.pad(x, ((0, 0),) * len(batch) + ((0, n_blocks * block - seq_len), (0, 0)))
    return x.reshape(*batch, n_blocks, block, dim)


def from_blocks(x: Array, seq_len: int) -> Array:
    """`(*batch, nb, block, D)` from `in_blocks`' layout back to `(*batch, S, D)`."""
    *batch, n_blocks, block, dim = x.shape
    return x.reshape(*batch, n_blocks * block, dim)[..., :seq_len, :]


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where each device's shard sits in the sequence: `devices` shards over the mesh
    axis `axis_name`; contiguous (device d holds positions `[d L, (d + 1) L)`) or
    zig-zag (the sequence in `2 devices` chunks, device d holding chunks d and
    `2 devices - 1 - d`, in that order)."""

    axis_name: str | tuple[str, ...]
    devices: int
    zigzag: bool

    @property
    def chunks(self) -> int:
        """Chunks per device."""
        return 2 if self.zigzag else 1

    def global_chunk(self, device, j):
        """The global index of chunk `j` of `device`'s shard (of `chunks * devices`)."""
        if not self.zigzag:
            return device
        return jnp.where(j == 0, device, 2 * self.devices - 1 - device)
