"""Model components of mm15: vision encoder, vision-language connector, LLM and their assembly."""

from safetensors import SafetensorError

# What reading a damaged model directory raises from transformers, safetensors or torch (a cut
# safetensors file, unreadable JSON, a tensor whose shape does not fit the config): the loaders re-raise
# it as a ValueError naming the directory. Missing files stay the OSError they are (their messages name
# them).
LOAD_ERRORS: tuple[type[Exception], ...] = (SafetensorError, ValueError, RuntimeError, EOFError)
