"""eqx_xlstm: xLSTM-style sequence mixing in Equinox.

Layers, from the bottom up (docs/architecture.md): `maths` (one head), `spec` (one
call), `implementations` (reference, chunked, linear, cudnn, triton, mosaic),
`dispatch` (the table that picks one), `functional.attention`, and `nn` (RoPE, the
backend, decoding states, layers).
"""

from . import implementations
from .checkpoint import (
    CheckpointError,
    checkpoint_args,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from .context_parallel import context_parallel_attention
from .functional import attention
from .nn.attention_backend import mLSTMBackendAttention, mLSTMBackendAttentionConfig
from .nn.backend import mLSTMBackend
from .nn.buffers import trainable_filter
from .nn.decoding import KVCache, LinearState, StateIdentity
from .nn.layers import Block, LanguageModel, ModelConfig, MultiHeadMixer
from .nn.registry import BACKENDS, create_mlstm_backend
from .nn.rope import apply_rotary_emb, precompute_freqs
from .nn.sharding import partition_specs
from .spec import AttentionSpec
from .typecheck import set_typechecking, typechecking_enabled

__all__ = [
    "BACKENDS",
    "AttentionSpec",
    "Block",
    "CheckpointError",
    "KVCache",
    "LanguageModel",
    "LinearState",
    "ModelConfig",
    "MultiHeadMixer",
    "StateIdentity",
    "apply_rotary_emb",
    "attention",
    "checkpoint_args",
    "context_parallel_attention",
    "create_mlstm_backend",
    "implementations",
    "load_checkpoint",
    "mLSTMBackend",
    "mLSTMBackendAttention",
    "mLSTMBackendAttentionConfig",
    "partition_specs",
    "precompute_freqs",
    "read_checkpoint_metadata",
    "save_checkpoint",
    "set_typechecking",
    "trainable_filter",
    "typechecking_enabled",
]

__version__ = "0.3.0"
