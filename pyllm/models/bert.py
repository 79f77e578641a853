"""BERT encoder (post-norm blocks, learned positions and token types, erf-GELU
MLP) and its masked-LM head, built only from :mod:`pyllm.nn` modules.

Module names follow Hugging Face's ``BertModel`` / ``BertForMaskedLM``, so
their checkpoints load as they are (:meth:`BertModel.from_hf`). Each block's
"add the sublayer's output to its input, then LayerNorm" is pyllm's fused
residual LayerNorm. :meth:`BertModel.encode` gives mean-pooled, normalised
sentence embeddings (the sentence-transformers recipe).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import pyllm
from pyllm.models.checkpoint import model_from_hf
from pyllm.nn import LayerNorm, Linear
from pyllm.nn.packing import PacksForInference

__all__ = ["BertConfig", "BertForMaskedLM", "BertModel", "BertOutput", "mean_pool"]

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclasses.dataclass
class BertConfig:
    """Sizes of a BERT encoder (names as Hugging Face's ``BertConfig``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"pyllm BertConfig: hidden_act {self.hidden_act!r} is not "
                                      f"supported (one of {', '.join(_ACTIVATIONS)})")

    @classmethod
    def from_hf(cls, config) -> "BertConfig":
        """From a ``transformers.BertConfig`` (or an object with its
        attributes); relative position embeddings and decoder use raise
        ``NotImplementedError``."""
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise NotImplementedError("pyllm BertConfig: position_embedding_type "
                                      f"{config.position_embedding_type!r} is not supported")
        if getattr(config, "is_decoder", False):
            raise NotImplementedError("pyllm BertConfig: is_decoder=True is not supported")
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers,
                   config.num_attention_heads, config.intermediate_size,
                   config.max_position_embeddings, config.type_vocab_size,
                   config.layer_norm_eps, config.hidden_act,
                   getattr(config, "pad_token_id", 0) or 0)


@dataclasses.dataclass
class BertOutput:
    """``last_hidden_state`` ``(batch, seq, hidden)``; ``pooler_output``
    ``(batch, hidden)`` (tanh of a dense layer on the first token) or None
    for a model without the pooler."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, c.pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, **factory)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size, **factory)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps, **factory)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query = Linear(c.hidden_size, c.hidden_size, device=device, dtype=dtype)
        self.key = Linear(c.hidden_size, c.hidden_size, device=device, dtype=dtype)
        self.value = Linear(c.hidden_size, c.hidden_size, device=device, dtype=dtype)

    def forward(self, x, mask):
        b, s, width = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, self.head_dim)
                   for p in (self.query, self.key, self.value))
        return pyllm.attention(q, k, v, bias=mask).reshape(b, s, width)


class BertAddNorm(nn.Module):
    """``LayerNorm(dense(h) + residual)`` with the add fused into the norm."""

    def __init__(self, c: BertConfig, in_features: int, device=None, dtype=None):
        super().__init__()
        self.dense = Linear(in_features, c.hidden_size, device=device, dtype=dtype)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h), residual)[0]


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.self = BertSelfAttention(c, device, dtype)
        self.output = BertAddNorm(c, c.hidden_size, device, dtype)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.intermediate_size, activation=_ACTIVATIONS[c.hidden_act],
                            device=device, dtype=dtype)

    def forward(self, x):
        return self.dense(x)


class BertLayer(nn.Module):
    """Post-norm block: attention, add & norm, GELU MLP, add & norm."""

    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.attention = BertAttention(c, device, dtype)
        self.intermediate = BertIntermediate(c, device, dtype)
        self.output = BertAddNorm(c, c.intermediate_size, device, dtype)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c, device, dtype) for _ in range(c.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size, device=device, dtype=dtype)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
              normalize: bool = True) -> torch.Tensor:
    """Mean over the real tokens: hidden ``(batch, seq, width)``,
    attention_mask ``(batch, seq)`` 1/0 (None: all real); returns
    ``(batch, width)`` in float32, L2-normalised when ``normalize``."""
    hidden = hidden.float()
    if attention_mask is None:
        pooled = hidden.mean(1)
    else:
        weights = attention_mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def _check_ids(owner, config, input_ids, token_type_ids):
    if input_ids.dim() != 2:
        raise ValueError(f"{owner}: input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{owner}: {input_ids.shape[1]} tokens exceed max_position_embeddings "
                         f"({config.max_position_embeddings})")
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(f"{owner}: token_type_ids must have input_ids' shape "
                         f"{tuple(input_ids.shape)}, got {tuple(token_type_ids.shape)}")


class BertModel(PacksForInference, nn.Module):
    """BERT encoder.

    ``forward(input_ids, attention_mask=None, token_type_ids=None)``:
    input_ids ``(batch, seq)`` int64; attention_mask ``(batch, seq)`` 1/0
    (0 = padding; padded keys are ignored); token_type_ids ``(batch, seq)``
    (default zeros). Returns a :class:`BertOutput` in the parameters' dtype.
    No dropout: training runs without it.
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, device=None,
                 dtype=None):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, device, dtype)
        self.encoder = BertEncoder(config, device, dtype)
        self.pooler = BertPooler(config, device, dtype) if add_pooling_layer else None

    @classmethod
    def from_hf(cls, source, *, dtype: torch.dtype | None = None) -> "BertModel":
        """The same encoder from a ``transformers`` ``BertModel`` (or a model
        containing one as ``bert``, e.g. ``BertForMaskedLM``) or a checkpoint
        directory; the pooler is kept when the checkpoint has one. A missing
        tensor raises ``KeyError`` naming it, a mismatched one ``ValueError``."""
        def build(config, state, **factory):
            pooled = any(k.endswith("pooler.dense.weight") for k in state)
            return cls(BertConfig.from_hf(config), pooled, **factory)

        return model_from_hf(source, build, "pyllm BertModel.from_hf", dtype, prefixes=("bert",))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        _check_ids("pyllm BertModel", self.config, input_ids, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return BertOutput(x, None if self.pooler is None else self.pooler(x))

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings ``(batch, hidden)`` float32: the real tokens'
        mean of the last hidden state, L2-normalised (sentence-transformers'
        mean pooling + Normalize)."""
        hidden = self(input_ids, attention_mask, token_type_ids).last_hidden_state
        return mean_pool(hidden, attention_mask, normalize)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size, activation=_ACTIVATIONS[c.hidden_act],
                            device=device, dtype=dtype)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps, device=device, dtype=dtype)

    def forward(self, x):
        return self.LayerNorm(self.dense(x))


class BertLMPredictionHead(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.transform = BertPredictionHeadTransform(c, device, dtype)
        self.decoder = Linear(c.hidden_size, c.vocab_size, device=device, dtype=dtype)
        self.bias = self.decoder.bias  # one bias, both names (as Hugging Face)

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, c: BertConfig, device=None, dtype=None):
        super().__init__()
        self.predictions = BertLMPredictionHead(c, device, dtype)


class BertForMaskedLM(PacksForInference, nn.Module):
    """BERT with the masked-LM head (decoder tied to the word embeddings).

    ``forward(input_ids, attention_mask=None, token_type_ids=None)`` as
    :class:`BertModel`; returns logits ``(batch, seq, vocab_size)``. Train
    with :func:`pyllm.models.masked_lm_loss`.
    """

    def __init__(self, config: BertConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False, device=device, dtype=dtype)
        self.cls = BertOnlyMLMHead(config, device, dtype)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    @classmethod
    def from_hf(cls, source, *, dtype: torch.dtype | None = None) -> "BertForMaskedLM":
        """From a ``transformers`` ``BertForMaskedLM`` or a checkpoint
        directory of one; errors as :meth:`BertModel.from_hf`."""
        return model_from_hf(
            source, lambda config, state, **f: cls(BertConfig.from_hf(config), **f),
            "pyllm BertForMaskedLM.from_hf", dtype, prefixes=("bert",))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        return self.cls.predictions(hidden)
