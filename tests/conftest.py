import importlib.util
import os

# XLA's CPU backend at LLVM optimisation level 0: the suite's programs are small, and
# compiling them is most of its time (about a third less with this; the arithmetic is
# the same IEEE operations, only less optimised machine code). Set before JAX starts
# its backend, and only where no CUDA plugin is installed (a GPU run keeps XLA's
# defaults); the subprocesses of `helpers.run_on_host_devices` inherit it.
CPU_COMPILE_FLAG = "--xla_backend_optimization_level=0"
_cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
if not _cuda and CPU_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_COMPILE_FLAG}".strip()

# Mosaic GPU interpret mode runs a kernel's warpgroups as threads, each executing on
# XLA's CPU client; under `jax.jit` the calling computation holds a thread of that
# client's pool too. The pool has one thread per core, so on this 2-core machine (or 1
# core) they could all wait on each other, at random (a hang, not a failure). More
# pool threads than the kernels' three warpgroups plus the caller: no such wait.
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402

# Catch accidental dtype promotion (e.g. bf16 silently becoming f32).
jax.config.update("jax_numpy_dtype_promotion", "strict")
