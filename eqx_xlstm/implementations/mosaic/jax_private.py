"""The Mosaic kernels' uses of JAX's private API, fenced here, each with a fallback
where JAX lacks it (tests/test_implementations.py checks the fallbacks).

- Mosaic GPU interpret mode (how the kernels run without a GPU) has no public entry
  point yet: `interpret_params`.
- `pl.run_state` makes refs without a memory space; Mosaic GPU kernels need their refs
  in GPU global memory, which takes an entry in JAX's table of ref types:
  `ref_type_mappings`, `gmem_ref_aval`.
- Code written in Mosaic GPU itself inside a Pallas kernel (`plgpu.inline_mgpu`, the
  backward's register-by-register epilogue) builds MLIR with JAX's bundled bindings:
  `mlir_modules` (where they differ, attention keeps swish and RoPE's gradient in XLA:
  `Mosaic.takes_raw`).
"""


def interpret_params():
    """The `interpret=` argument that runs a Mosaic GPU kernel in interpret mode; an
    ImportError where this jax has no such mode."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def interpret_available() -> bool:
    """Whether this jax can run the Mosaic GPU kernels in interpret mode."""
    try:
        interpret_params()
    except ImportError:
        return False
    return True


def ref_type_mappings() -> dict | None:
    """JAX's table of how `run_state` turns an initial value into a ref, or None where
    this jax has none."""
    try:
        from jax._src.state import types

        return types._ref_type_aval_mappings
    except (ImportError, AttributeError):
        return None


def gmem_ref_aval(value, memory_space):
    """The abstract ref, in `memory_space`, of a ref that starts as `value`."""
    import jax
    from jax._src.state.types import AbstractRef

    return AbstractRef(jax.typeof(value), memory_space=memory_space)


def mlir_modules():
    """`(ir, arith, llvm, vector)`: the MLIR bindings Mosaic GPU itself builds with; an
    ImportError where this jax has them elsewhere."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector

    return ir, arith, llvm, vector


def mlir_available() -> bool:
    """Whether `mlir_modules` finds the bindings."""
    try:
        mlir_modules()
    except ImportError:
        return False
    return True
