"""The one use of JAX's private API outside the Mosaic kernels, fenced here with a
fallback: which axis an enclosing `jax.vmap` maps (see `dispatch.run`)."""


def mapped_axis(*arrays, others=()) -> int | None:
    """The axis of `arrays` that the innermost enclosing `jax.vmap` maps, when it maps
    all of them along the same axis and none of `others`; else None. None also where
    this jax's internals differ from what this reads (the caller then runs unchanged,
    only without the saving)."""
    try:
        from jax._src import core
        from jax._src.interpreters.batching import BatchTracer
    except ImportError:
        return None
    if not all(isinstance(x, BatchTracer) for x in arrays):
        return None
    trace = getattr(arrays[0], "_trace", None)
    current = getattr(getattr(core, "trace_ctx", None), "trace", None)
    if trace is None or current is not trace:
        return None  # another transformation sits inside the vmap
    if any(x._trace is not trace for x in arrays):
        return None
    if any(isinstance(x, BatchTracer) and x._trace is trace for x in others):
        return None
    axes = {x.batch_dim for x in arrays}
    axis = axes.pop()
    return axis if not axes and isinstance(axis, int) else None
