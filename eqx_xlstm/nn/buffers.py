"""Keeping non-trainable buffers (RoPE tables) out of gradients and optimizers."""

import equinox as eqx
import jax
from jaxtyping import PyTree


def _holds_buffers(node) -> bool:
    return isinstance(node, eqx.Module) and bool(getattr(node, "buffer_fields", ()))


def trainable_filter(tree: PyTree) -> PyTree[bool]:
    """A filter spec: True for every trainable floating array of `tree`, False for
    buffers (fields a module lists in its `buffer_fields`) and everything else.

    AdamW's weight decay changes an array even when its gradient is zero, so
    buffers must be kept out of the optimizer, for example::

        params, static = eqx.partition(model, eqx_xlstm.trainable_filter(model))
        opt_state = optimizer.init(params)

    The result also works as the `mask` of `optax.masked`.
    """

    def spec(node):
        if not _holds_buffers(node):
            return eqx.is_inexact_array(node)
        children = jax.tree.map(spec, node, is_leaf=lambda x: x is not node and _holds_buffers(x))
        names = node.buffer_fields
        return eqx.tree_at(
            lambda m: [getattr(m, name) for name in names],
            children,
            replace=[False] * len(names),
        )

    return jax.tree.map(spec, tree, is_leaf=_holds_buffers)
