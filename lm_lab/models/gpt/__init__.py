"""GPT-2 (decoder): network and Hugging Face mapping."""

from lm_lab.models.gpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
