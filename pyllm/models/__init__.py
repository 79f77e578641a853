"""Models built only from :mod:`pyllm.nn` modules, loading Hugging Face
weights (``from_hf``: a ``transformers`` model object or a checkpoint
directory).

- :class:`GPT2LMHeadModel` (:class:`GPT2Config`): GPT-2, generates with KV caches.
- :class:`LlamaForCausalLM` (:class:`LlamaConfig`): LLaMA-style decoder
  (RMSNorm, rotary, GQA, SwiGLU), generates with KV caches.
- :class:`BertModel`, :class:`BertForMaskedLM` (:class:`BertConfig`): BERT
  encoder, sentence embeddings (:meth:`BertModel.encode`), masked-LM head.
- :func:`causal_lm_loss`, :func:`masked_lm_loss`: training losses;
  :func:`perplexity`: sliding-window evaluation of a causal model.
"""

from pyllm.models.bert import BertConfig, BertForMaskedLM, BertModel, BertOutput, mean_pool
from pyllm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from pyllm.models.llama import LlamaConfig, LlamaForCausalLM
from pyllm.models.losses import causal_lm_loss, masked_lm_loss
from pyllm.models.perplexity import perplexity

__all__ = ["BertConfig", "BertForMaskedLM", "BertModel", "BertOutput", "GPT2Config",
           "GPT2LMHeadModel", "LlamaConfig", "LlamaForCausalLM", "causal_lm_loss",
           "masked_lm_loss", "mean_pool", "perplexity"]
