"""Building mLSTM backends by name."""

import dataclasses
from typing import Any

from .attention_backend import mLSTMBackendAttention
from .backend import mLSTMBackend

BACKENDS: dict[str, type[mLSTMBackend]] = {"attention": mLSTMBackendAttention}


def backend_class(name: str) -> type[mLSTMBackend]:
    """The backend class registered under `name`; a ValueError listing valid names."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in sorted(BACKENDS))
        raise ValueError(f"Unknown mLSTM backend {name!r}; valid names are {valid}.") from None


def create_mlstm_backend(
    name: str, *, qk_head_dim: int, config: Any = None, **config_kwargs: Any
) -> mLSTMBackend:
    """Build the backend registered as `name`.

    **Arguments:**

    - `name`: a registered backend name (`"attention"`).
    - `qk_head_dim`: head dimension of queries and keys.
    - `config`: an instance of the backend's `config_class`; built from
        `config_kwargs` when omitted. `config_kwargs` also override its fields.
    """
    cls = backend_class(name)
    if config is None:
        config = cls.config_class(**config_kwargs)
    elif config_kwargs:
        config = dataclasses.replace(config, **config_kwargs)
    return cls(config, qk_head_dim=qk_head_dim)
