"""The tokenizer error (a leaf module: every tokenizer format raises it)."""

from llama.common.errors import UserError


class TokenizerError(UserError):
    """A tokenizer file is missing, corrupt or does not fit the model it is paired with."""
