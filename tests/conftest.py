import jax

# Catch accidental dtype promotion (e.g. bf16 silently becoming f32).
jax.config.update("jax_numpy_dtype_promotion", "strict")


import pytest  # noqa: E402


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the chunked paths' blocks so tests at small S span many blocks."""
    import eqx_xlstm._dispatch as dispatch

    monkeypatch.setattr(dispatch, "BLOCK", 5)
    monkeypatch.setattr(dispatch, "LINEAR_CHUNK", {})
    monkeypatch.setattr(dispatch, "LINEAR_CHUNK_DEFAULT", 4)
