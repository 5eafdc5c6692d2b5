"""Names of the attention options and their validation."""

ACTIVATIONS = ("softmax", "sigmoid", "none")
PRE_ACTIVATIONS = ("none", "swish", "silu")


def check_option(value: object, valid: tuple[str, ...], name: str) -> str:
    """Return `value` if it is one of `valid`, else raise a ValueError listing them."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(
            f"Unknown {name} {value!r}; valid values are " + ", ".join(repr(v) for v in valid) + "."
        )
    return value
