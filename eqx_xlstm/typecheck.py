"""Runtime shape/dtype checking of the public API with jaxtyping + beartype.

Checking is on by default. It runs while JAX traces, so a jitted call pays for it
once per compilation and never again. Switch it off with the environment variable
``EQX_XLSTM_TYPECHECK=0`` (read at import) or with :func:`set_typechecking`.
"""

import functools
import os
from collections.abc import Callable
from typing import TypeVar

from beartype import beartype
from jaxtyping import jaxtyped

_F = TypeVar("_F", bound=Callable)

_enabled = os.environ.get("EQX_XLSTM_TYPECHECK", "1").strip().lower() not in {
    "0",
    "false",
    "off",
    "no",
}


def set_typechecking(enabled: bool) -> None:
    """Switch runtime type checking of eqx_xlstm's public functions on or off.

    Takes effect at the next trace: functions already compiled by `jax.jit` keep the
    behaviour they were traced with.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__}.")
    _enabled = enabled


def typechecking_enabled() -> bool:
    """Whether eqx_xlstm's public functions check shapes and dtypes at trace time."""
    return _enabled


def typechecked(fn: _F) -> _F:
    """Check `fn`'s jaxtyping annotations with beartype while checking is enabled."""
    checked = jaxtyped(fn, typechecker=beartype)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return (checked if _enabled else fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
