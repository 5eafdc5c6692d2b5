"""The abstract base of every mLSTM backend."""

import abc

import equinox as eqx
from jaxtyping import Array


class mLSTMBackend(eqx.Module):  # noqa: N801 (upstream name)
    """A sequence mixer with the mLSTM cell's interface.

    Subclasses take per-head queries, keys, values, input and forget gate
    pre-activations and optional initial states `(c, n, m)`, and return the hidden
    states (and the last states when `return_last_states=True`).
    """

    @property
    @abc.abstractmethod
    def can_vmap_over_heads(self) -> bool:
        """Whether the backend works on one head at a time, so a layer may
        `eqx.filter_vmap` it over the heads axis."""

    @abc.abstractmethod
    def __call__(
        self,
        q: Array,
        k: Array,
        v: Array,
        i: Array | None = None,
        f: Array | None = None,
        c_initial: Array | None = None,
        n_initial: Array | None = None,
        m_initial: Array | None = None,
        return_last_states: bool = False,
    ):
        """Mix the sequence; see the subclass for shapes."""
