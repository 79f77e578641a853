"""Models built only from :mod:`pyllm.nn` modules.

- :class:`LlamaForCausalLM` (:class:`LlamaConfig`): LLaMA-style decoder,
  loads Hugging Face weights (``from_hf``), generates with KV caches.
"""

from pyllm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from pyllm.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["GPT2Config", "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM"]
