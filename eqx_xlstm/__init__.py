"""eqx_xlstm: xLSTM-style sequence mixing in Equinox."""

from ._attention import attention
from ._attention_backend import mLSTMBackendAttention, mLSTMBackendAttentionConfig
from ._backend import mLSTMBackend
from ._buffers import trainable_filter
from ._checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from ._layers import Block, LanguageModel, ModelConfig, MultiHeadMixer
from ._registry import BACKENDS, create_mlstm_backend
from ._rope import apply_rotary_emb, precompute_freqs
from ._typecheck import set_typechecking, typechecking_enabled

__all__ = [
    "BACKENDS",
    "Block",
    "LanguageModel",
    "ModelConfig",
    "MultiHeadMixer",
    "apply_rotary_emb",
    "attention",
    "create_mlstm_backend",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
    "mLSTMBackend",
    "mLSTMBackendAttention",
    "mLSTMBackendAttentionConfig",
    "precompute_freqs",
    "set_typechecking",
    "trainable_filter",
    "typechecking_enabled",
]

__version__ = "0.1.0"
