"""mm15: an open, tested implementation of Apple's MM1.5 multimodal LLM family and training recipe."""

__version__ = "0.1.0"
