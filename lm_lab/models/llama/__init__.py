"""Llama-style decoder: the network (``model``) and Hugging Face ``LlamaForCausalLM`` interop (``hf``)."""

from lm_lab.models.llama.hf import config_from_hf, hf_config_dict, hf_state_dict, load_hf_state_dict
from lm_lab.models.llama.model import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig", "config_from_hf", "hf_config_dict", "hf_state_dict", "load_hf_state_dict"]
