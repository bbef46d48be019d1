"""reasoning-llama: a small LLaMA-architecture reasoning model, end to end."""

__version__ = "0.1.0"
