"""A third-party architecture for Plait: ``TinyGatedLlamaForCausalLM``."""
