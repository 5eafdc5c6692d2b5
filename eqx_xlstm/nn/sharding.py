"""Where a model's arrays go on a device mesh: tensor (head) parallelism over a `model`
axis, parameters sharded over the `data` axis as well (FSDP-style)."""

import equinox as eqx
import jax
from jax.sharding import Mesh, PartitionSpec

from .layers import Block, LanguageModel, MultiHeadMixer


def _axis(mesh: Mesh, name: str | None, size: int) -> str | None:
    """`name` if the mesh has that axis, larger than 1, and it divides `size`."""
    if name is None or name not in mesh.shape or mesh.shape[name] == 1:
        return None
    return name if size % mesh.shape[name] == 0 else None


def partition_specs(
    model, mesh: Mesh, *, model_axis: str = "model", data_axis: str | None = "data"
):
    """The `PartitionSpec` of every array of `model` (a `LanguageModel`, `Block`,
    `MultiHeadMixer`, or any pytree holding them) on `mesh`; None for non-arrays.

    Megatron-style tensor parallelism over `model_axis`: the q, k and v projections are
    column-parallel (their output features, whole heads, split over the axis, so each
    device runs attention for its heads with no communication), the output projection
    row-parallel (one all-reduce per mixer); the feed-forward up projection
    column-parallel and the down projection row-parallel (one more); the vocabulary
    head column-parallel. With `data_axis` (None: off) each weight's other dimension is
    split over the data axis too (FSDP-style: XLA gathers a weight where it is used and
    reduce-scatters its gradient), and so is the embedding table. An axis the mesh lacks,
    of size 1, or not dividing a dimension is left out of that dimension. Optimizer
    state built from parameters placed this way (`optax` `init` under `jax.jit`) follows
    them.

    Use with `jax.NamedSharding`:

        specs = ex.partition_specs(model, mesh)
        model = eqx.filter_shard(model, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    """
    placed = {}  # id(array) -> its spec; every other array is replicated

    def linear(layer: eqx.nn.Linear, split_out: bool):
        out_size, in_size = layer.weight.shape
        out_axis = model_axis if split_out else data_axis
        in_axis = data_axis if split_out else model_axis
        spec = (_axis(mesh, out_axis, out_size), _axis(mesh, in_axis, in_size))
        placed[id(layer.weight)] = PartitionSpec(*spec)
        if layer.bias is not None and split_out:
            placed[id(layer.bias)] = PartitionSpec(spec[0])

    def visit(module):
        if isinstance(module, MultiHeadMixer):
            for layer in (module.q_proj, module.k_proj, module.v_proj):
                linear(layer, split_out=True)
            linear(module.out_proj, split_out=False)
        elif isinstance(module, Block):
            visit(module.mixer)
            linear(module.ffn_up, split_out=True)
            linear(module.ffn_down, split_out=False)
        elif isinstance(module, LanguageModel):
            for block in module.blocks:
                visit(block)
            table = module.embedding.weight
            placed[id(table)] = PartitionSpec(_axis(mesh, data_axis, table.shape[0]), None)
            linear(module.head, split_out=True)

    is_layer = lambda x: isinstance(x, (MultiHeadMixer, Block, LanguageModel))
    for leaf in jax.tree.leaves(model, is_leaf=is_layer):
        visit(leaf)
    return jax.tree.map(
        lambda x: placed.get(id(x), PartitionSpec()) if eqx.is_array(x) else None, model
    )
