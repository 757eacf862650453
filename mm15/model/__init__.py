"""Model components of mm15: vision encoder, vision-language connector, LLM and their assembly."""
