import importlib.util
import os
import subprocess
import sys

# XLA's CPU backend compiling fast: the suite's programs are small, and compiling them
# is most of its time. LLVM at optimisation level 0 (about a third less), and XLA's
# older loop emitters instead of its MLIR fusion emitters (about a third less again on
# the 4-device checks); the arithmetic is the same IEEE operations, only less optimised
# machine code. Set before JAX starts its backend, and only where no CUDA plugin is
# installed (a GPU run keeps XLA's defaults); the subprocesses of
# `helpers.run_on_host_devices` inherit them. A flag this jax's XLA does not know would
# abort the process, so the second is tried in a subprocess first.
CPU_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_PROBE = "import jax; jax.devices()"


def _xla_takes(flag: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True)
    return probe.returncode == 0


_cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
for _flag in CPU_COMPILE_FLAGS:
    _flags = os.environ.get("XLA_FLAGS", "")
    if _cuda or _flag in _flags:
        continue
    if _flag == CPU_COMPILE_FLAGS[0] or _xla_takes(_flag):
        os.environ["XLA_FLAGS"] = f"{_flags} {_flag}".strip()

# Mosaic GPU interpret mode runs a kernel's warpgroups as threads, each executing on
# XLA's CPU client; under `jax.jit` the calling computation holds a thread of that
# client's pool too. The pool has one thread per core, so on this 2-core machine (or 1
# core) they could all wait on each other, at random (a hang, not a failure). More
# pool threads than the kernels' three warpgroups plus the caller: no such wait.
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402

# Catch accidental dtype promotion (e.g. bf16 silently becoming f32).
jax.config.update("jax_numpy_dtype_promotion", "strict")
