import jax

# Catch accidental dtype promotion (e.g. bf16 silently becoming f32).
jax.config.update("jax_numpy_dtype_promotion", "strict")
