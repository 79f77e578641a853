"""Attention modules on :func:`pyllm.attention`: :class:`Attention` (self or
cross, causal, grouped-query, rotary position embeddings, a pre-allocated
:class:`KVCache`), :class:`RotaryEmbedding`, and :class:`MultiheadAttention`
(``torch.nn.MultiheadAttention``'s interface for the common cases).

Projection names follow Hugging Face's Llama (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``), so its attention weights load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

import pyllm
from pyllm.nn.linear import Linear
from pyllm.nn.packing import WeightPack, packed_call_allowed, packed_serves_rows
from pyllm.ops import direct
from pyllm.ops.packed_linear import linear_packed

__all__ = ["Attention", "KVCache", "MultiheadAttention", "RotaryEmbedding"]

# the CPU kernels' dtypes (others, e.g. float64, route to the reference backend)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on :func:`pyllm.rotary` (the fused kernel).

    Args:
        head_dim: the heads' width; base: the frequency base (``rope_theta``).
        rotary_dim: the rotated part of each head (even; default head_dim:
            partial rotary below it).
        rope_parameters: transformers' scaling (``rope_type`` default, linear,
            dynamic, llama3 or yarn, and its keys; see
            :func:`pyllm.ops.rotary.rotary_inv_freq`).
        max_position_embeddings: the model's (dynamic and yarn need it).
        interleaved: GPT-J pairs ``(2i, 2i + 1)`` instead of GPT-NeoX/LLaMA's
            ``(i, i + rotary_dim / 2)``.

    ``rotate(q, k, positions)`` rotates q ``(batch, seq, heads, head_dim)``
    and k in place (one kernel) and returns them; ``forward(x, positions)``
    returns x rotated (a new tensor). positions: ``(seq,)`` or ``(batch, seq)``
    integers. The cos/sin tables are computed once per length (float32) and
    kept.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device=None, *,
                 rotary_dim: int | None = None, rope_parameters: dict | None = None,
                 max_position_embeddings: int | None = None, interleaved: bool = False):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"pyllm.nn.RotaryEmbedding: rotary_dim must be even and between 2 "
                             f"and head_dim {head_dim}, got {rotary_dim}")
        from pyllm.ops.rotary import rotary_inv_freq

        self.rotary_dim, self.base, self.interleaved = rotary_dim, base, interleaved
        self.rope_parameters = dict(rope_parameters or {})
        self.max_position_embeddings = max_position_embeddings
        inv_freq, self.attention_factor = rotary_inv_freq(
            rotary_dim, base, self.rope_parameters, max_position_embeddings=max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self._tables: dict = {}

    def _dynamic(self) -> bool:
        kind = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        return kind == "dynamic"

    def tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``(>= length, rotary_dim // 2)`` float32 on ``device``."""
        dynamic = self._dynamic() and length > (self.max_position_embeddings or 0)
        size = length if dynamic else max(256, 1 << max(length - 1, 0).bit_length())
        key = (size, str(device), dynamic)
        found = self._tables.get(key)
        if found is None:
            from pyllm.ops.rotary import rotary_tables

            if not dynamic:
                self._tables = {k: v for k, v in self._tables.items() if k[2]}  # one static size kept
            if dynamic or self.inv_freq.device.type == "meta":
                found = rotary_tables(self.rotary_dim, size, self.base, self.rope_parameters,
                                      max_position_embeddings=self.max_position_embeddings,
                                      device=device)
            else:
                angles = torch.arange(size, dtype=torch.float32, device=device)[:, None] * \
                    self.inv_freq.to(device)[None, :]
                found = (angles.cos() * self.attention_factor, angles.sin() * self.attention_factor)
            self._tables[key] = found
        return found

    def _length(self, positions: torch.Tensor) -> int:
        return int(positions.max()) + 1 if positions.numel() else 1

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               length: int | None = None, inplace: bool = True):
        """q and k rotated (in place unless ``inplace`` is False); ``length`` (>
        every position), when known, spares reading the positions' maximum."""
        cos, sin = self.tables(length or self._length(positions), q.device)
        if inplace and q.dtype in _KERNEL_DTYPES and packed_call_allowed(q, k, positions) and \
                q.dim() == 4 and positions.dtype == torch.int64 and positions.is_contiguous():
            # a plain eager CPU call of tensors this module made (the
            # operator checks them; no autograd, no routing): the operator
            # without the face's Python checks
            if positions.dim() == 1 and positions.shape[0] == q.shape[1]:
                positions = positions.view(1, -1) if q.shape[0] == 1 else \
                    positions.expand(q.shape[0], -1).contiguous()
            if positions.shape == q.shape[:2]:
                torch.ops.pyllm.rotary(q, k, cos, sin, positions, self.interleaved, False)
                return q, k
        return pyllm.rotary(q, k, cos, sin, positions, interleaved=self.interleaved,
                            inplace=inplace)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables(self._length(positions), x.device)
        none = x[..., :0, :]
        return pyllm.rotary(x, none, cos, sin, positions, interleaved=self.interleaved,
                            inplace=False)[0]


class KVCache:
    """Keys and values of past tokens, allocated once for ``max_tokens``.

    ``keys``/``values``: ``(batch, max_tokens, heads_kv, head_dim)``;
    ``length``: tokens filled. :meth:`append` writes new tokens and returns
    views of everything filled so far (no copy of the past).
    """

    def __init__(self, batch: int, max_tokens: int, heads_kv: int, head_dim: int, *,
                 dtype=None, device=None):
        shape = (batch, max_tokens, heads_kv, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[1]
        if self.length + new > self.keys.shape[1]:
            raise ValueError(f"pyllm.nn.KVCache: {self.length} + {new} tokens exceed the "
                             f"{self.keys.shape[1]} allocated")
        self.keys[:, self.length:self.length + new] = k
        self.values[:, self.length:self.length + new] = v
        self.length += new
        return self.keys[:, :self.length], self.values[:, :self.length]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary
    embeddings and a KV cache.

    Args:
        hidden_size: model width (input and output features).
        num_heads: query heads; ``head_dim`` defaults to hidden_size // num_heads.
        num_kv_heads: key/value heads, dividing num_heads (default num_heads).
        bias: biases on q/k/v projections; ``out_bias`` on o_proj (default: bias).
        causal: causal self-attention (bottom-right aligned with a cache).
        rope_base: rotary embeddings with this base, or None for none;
            ``rope_parameters``, ``rotary_dim``, ``max_position_embeddings``:
            their scaling and partial rotary (:class:`RotaryEmbedding`).
        kv_size: width of the cross-attention context (default hidden_size).
        window_size, softcap, alibi_slopes: as :func:`pyllm.attention` (a
            sliding window, e.g. ``(W - 1, 0)``; Gemma 2's softcap; ALiBi
            slopes ``(num_heads,)``, kept as a buffer). The window and ALiBi
            are positions of self-attention: a cross-attention call with
            either raises.
        sinks: a learned attention sink per head (gpt-oss), the parameter
            ``sinks`` ``(num_heads,)``, initialised to zero.
        device, dtype: of the parameters.

    ``forward(x, context=None, *, cache=None, positions=None, mask=None)``:
    x ``(batch, seq, hidden_size)``; context ``(batch, seq_k, kv_size)`` for
    cross-attention (keys and values from it, no rotary, not causal);
    cache a :class:`KVCache` that the new keys/values are appended to, or a
    :class:`pyllm.nn.PagedKVCache` (each of its sequences gets ``seq`` new
    tokens, or, with ``cu_seqlens`` ``(sequences + 1,)`` and x packed ``(1,
    tokens, hidden_size)``, ``cu_seqlens[i + 1] - cu_seqlens[i]`` tokens:
    sequences of different lengths without padding; no mask);
    positions ``(seq,)`` or ``(batch, seq)`` for the rotary embedding (default
    cache length + arange(seq)); mask a bool (True = attend) or additive
    tensor broadcastable to ``(batch, heads, seq, seq_k)`` (e.g. key padding
    ``(batch, 1, 1, seq_k)``). Returns ``(batch, seq, hidden_size)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool | None = None,
                 causal: bool = True, rope_base: float | None = None, kv_size: int | None = None,
                 rope_parameters: dict | None = None, rotary_dim: int | None = None,
                 max_position_embeddings: int | None = None,
                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 alibi_slopes: torch.Tensor | None = None, sinks: bool = False, device=None,
                 dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"pyllm.nn.Attention: num_kv_heads ({num_kv_heads}) must divide "
                             f"num_heads ({num_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.causal = causal
        kv_size = kv_size or hidden_size
        factory = {"device": device, "dtype": dtype}
        self.q_proj = Linear(hidden_size, num_heads * self.head_dim, bias, **factory)
        self.k_proj = Linear(kv_size, num_kv_heads * self.head_dim, bias, **factory)
        self.v_proj = Linear(kv_size, num_kv_heads * self.head_dim, bias, **factory)
        self.o_proj = Linear(num_heads * self.head_dim, hidden_size,
                             bias if out_bias is None else out_bias, **factory)
        self.rotary = RotaryEmbedding(
            self.head_dim, rope_base, device, rotary_dim=rotary_dim,
            rope_parameters=rope_parameters,
            max_position_embeddings=max_position_embeddings) if rope_base else None
        self.window_size = tuple(window_size)
        self.softcap = float(softcap)
        if alibi_slopes is not None:
            alibi_slopes = torch.as_tensor(alibi_slopes, dtype=torch.float32, device=device)
            if alibi_slopes.shape != (num_heads,):
                raise ValueError(f"pyllm.nn.Attention: alibi_slopes must have shape (num_heads,) "
                                 f"= ({num_heads},), got {tuple(alibi_slopes.shape)}")
        self.register_buffer("alibi_slopes", alibi_slopes)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None
        self._qkv_pack: WeightPack | None = None

    # -- packed weights (CPU inference) ------------------------------------------

    def pack(self) -> "Attention":
        """Packs the projections for CPU inference (:mod:`pyllm.nn.packing`):
        q, k and v as one weight stacked along the output features (one GEMM
        of x per self-attention call: at a decode row, one stream of the
        three weights), ``o_proj`` as :meth:`Linear.pack`. Self-attention
        calls that take packed weights then give the unpacked module's
        outputs; cross-attention calls (``context``) read the unpacked q/k/v
        weights. Returns self."""
        weights = self._qkv_weights()
        if self.q_proj.in_features == self.k_proj.in_features:
            if self._qkv_pack is None:
                self._qkv_pack = WeightPack(*weights)
            else:
                self._qkv_pack.get(*weights)
        self.o_proj.pack()
        return self

    def unpack(self) -> "Attention":
        """Drops the packed copies. Returns self."""
        self._qkv_pack = None
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            proj.unpack()
        return self

    @property
    def is_packed(self) -> bool:
        """Whether q, k and v are packed as one weight."""
        return self._qkv_pack is not None

    def packed_nbytes(self) -> int:
        """Memory of the q/k/v packed copy (bytes; ``o_proj``'s is
        ``o_proj.packed_nbytes()``)."""
        pack = self._qkv_pack
        return pack.packed.panels.nbytes if pack is not None and pack.packed else 0

    def _qkv_weights(self):
        return self.q_proj.weight, self.k_proj.weight, self.v_proj.weight

    def _qkv_packed(self, x: torch.Tensor):
        """``(q, k, v)`` projections of x from the stacked packed weight (views
        of one output), or None when the call must take the three modules."""
        pack = self._qkv_pack
        if pack is None:
            return None
        weights = self._qkv_weights()
        biases = [p.bias for p in (self.q_proj, self.k_proj, self.v_proj)]
        if (x.dtype != weights[0].dtype or torch.is_autocast_enabled(x.device.type)
                or not packed_call_allowed(x, *weights, *biases)):
            return None
        packed = pack.get(*weights)
        if packed is None or not packed_serves_rows(x, packed):
            return None
        bias = self._qkv_bias(x, weights, biases)
        qkv = direct.linear_packed(x, weights[0], bias, packed)
        if qkv is None:
            qkv = linear_packed(x, packed, bias)
        return qkv.split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def _qkv_bias(x, weights, biases):
        """The stacked weight's bias for x: the three biases (zeros for a
        missing one) in one, or None when none has a bias."""
        if all(b is None for b in biases):
            return None
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0])
                          for b, w in zip(biases, weights)])
        if bias.dtype not in (x.dtype, torch.float32):  # as Linear: float32 kept
            bias = bias.to(x.dtype)
        return bias

    def new_cache(self, batch: int, max_tokens: int, *, dtype=None, device=None) -> KVCache:
        """A :class:`KVCache` for this module (parameters' dtype/device by default)."""
        p = self.k_proj.weight
        return KVCache(batch, max_tokens, self.num_kv_heads, self.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def new_paged_cache(self, batch: int, max_tokens: int, *, page_size: int = 16,
                        num_pages: int | None = None, dtype=None, device=None):
        """A :class:`pyllm.nn.PagedKVCache` for this module (parameters'
        dtype/device by default)."""
        from pyllm.nn.paged_kv_cache import PagedKVCache

        p = self.k_proj.weight
        return PagedKVCache(batch, max_tokens, self.num_kv_heads, self.head_dim,
                            page_size=page_size, num_pages=num_pages, dtype=dtype or p.dtype,
                            device=device or p.device)

    def _forward_paged(self, x, cache, positions, mask, cu_seqlens):
        """forward through a PagedKVCache: the new tokens appended (the
        rotary embedding fused into the append), then attention over each
        sequence's pages."""
        if mask is not None:
            raise ValueError("pyllm.nn.Attention: a PagedKVCache holds each sequence's own tokens "
                             "(no padding): pass no mask")
        b, s, _ = x.shape
        counts = cache.step_counts(x.shape, cu_seqlens, "pyllm.nn.Attention")
        tokens = b * s
        qkv = self._qkv_packed(x)
        if qkv is None:
            qkv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = qkv[0].view(tokens, -1, self.head_dim)
        k = qkv[1].view(tokens, -1, self.head_dim)
        v = qkv[2].view(tokens, -1, self.head_dim)
        rotary = {}
        if self.rotary is not None:
            if positions is not None:
                positions = positions.expand(b, s).reshape(tokens)
                length = int(positions.max()) + 1 if tokens else 1
            else:
                length = max((n + c for n, c in zip(cache.lengths, counts)), default=1)
            cos, sin = self.rotary.tables(max(length, 1), x.device)
            rotary = dict(q=q, cos=cos, sin=sin, positions=positions,
                          interleaved=self.rotary.interleaved)
        cache.append(k, v, counts, **rotary)
        out = cache.attention(q, counts, causal=self.causal, window_size=self.window_size,
                              softcap=self.softcap, alibi_slopes=self.alibi_slopes,
                              sinks=self.sinks)
        return self.o_proj(out.view(b, s, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        from pyllm.nn.paged_kv_cache import PagedKVCache

        if isinstance(cache, PagedKVCache):
            if context is not None:
                raise ValueError("pyllm.nn.Attention: a PagedKVCache serves self-attention only")
            return self._forward_paged(x, cache, positions, mask, cu_seqlens)
        if cu_seqlens is not None:
            raise ValueError("pyllm.nn.Attention: cu_seqlens (packed sequences) needs a "
                             "PagedKVCache")
        b, s, _ = x.shape
        source = x if context is None else context
        # heads from the projections' width: under tensor parallelism
        # (ColwiseParallel) each rank holds its share of the heads
        qkv = self._qkv_packed(x) if context is None else None
        if qkv is None:
            qkv = self.q_proj(x), self.k_proj(source), self.v_proj(source)
        q = qkv[0].view(b, s, -1, self.head_dim)
        k = qkv[1].view(b, source.shape[1], -1, self.head_dim)
        v = qkv[2].view(b, source.shape[1], -1, self.head_dim)
        if self.rotary is not None and context is None:
            length = None
            if positions is None:
                start = cache.length if cache is not None else 0
                positions, length = torch.arange(start, start + s, device=x.device), start + s
            # under tensor parallelism the projections' outputs are views made
            # by DTensor's to_local, which autograd forbids rotating in place
            inplace = type(self.q_proj.weight).__name__ != "DTensor"
            q, k = self.rotary.rotate(q, k, positions, length, inplace=inplace)
        if cache is not None:
            k, v = cache.append(k, v)
        causal = self.causal and context is None
        if context is not None and (self.window_size != (-1, -1) or self.alibi_slopes is not None):
            raise ValueError("pyllm.nn.Attention: window_size and alibi_slopes are positions of "
                             "self-attention; this module has them, and the call gives a context "
                             "(cross-attention)")
        out = pyllm.attention(q, k, v, causal=causal, bias=mask, window_size=self.window_size,
                              softcap=self.softcap, alibi_slopes=self.alibi_slopes,
                              sinks=self.sinks)
        return self.o_proj(out.reshape(b, s, -1))


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on :func:`pyllm.attention` for the common
    cases: a subclass of it, with torch's arguments, parameters,
    initialisation and ``state_dict`` keys (``in_proj_weight``/``in_proj_bias``
    or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ,
    ``out_proj.weight``/``out_proj.bias``; ``out_proj`` is a
    :class:`pyllm.nn.Linear`).

    Supported: ``batch_first`` either way, ``kdim``/``vdim``,
    ``key_padding_mask`` and ``attn_mask`` (bool, True = not allowed, or
    additive float; ``(L, S)`` or ``(batch * heads, L, S)``), ``is_causal``
    (causal when no ``attn_mask`` is given). Not supported, with an error
    saying so: ``need_weights=True`` (the attention matrix is never formed:
    pass ``need_weights=False``), ``add_bias_kv``, ``add_zero_attn``, and
    ``dropout > 0`` while training. A query whose keys are all masked gets
    zeros (torch gives NaN).

    Shapes: query ``(L, N, E)`` (``(N, L, E)`` with batch_first), key/value
    ``(S, N, kdim/vdim)``; returns ``(attn_output, None)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("pyllm.nn.MultiheadAttention: add_bias_kv and add_zero_attn "
                                      "are not supported")
        if embed_dim % num_heads:
            raise ValueError(f"pyllm.nn.MultiheadAttention: embed_dim ({embed_dim}) must be "
                             f"divisible by num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout, bias, False, False, kdim, vdim,
                         batch_first, device=device, dtype=dtype)
        # torch's out_proj (a Linear with a zero bias) on pyllm's kernel
        torch_out = self.out_proj
        self.out_proj = Linear(embed_dim, embed_dim, bias, device=device, dtype=dtype)
        with torch.no_grad():
            self.out_proj.weight.copy_(torch_out.weight)
            if bias:
                self.out_proj.bias.copy_(torch_out.bias)

    def _weights(self):
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _mask(self, attn_mask, key_padding_mask, batch, q_len, k_len):
        """attn_mask and key_padding_mask as one additive float32 bias, or None."""
        bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(
                    attn_mask, float("-inf"))
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, q_len, k_len)
            bias = attn_mask.float()
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, k_len):
                raise ValueError(f"pyllm.nn.MultiheadAttention: key_padding_mask must have shape "
                                 f"({batch}, {k_len}), got {tuple(key_padding_mask.shape)}")
            pad = key_padding_mask
            if pad.dtype == torch.bool:
                pad = torch.zeros(pad.shape, device=pad.device).masked_fill(pad, float("-inf"))
            pad = pad.float().view(batch, 1, 1, k_len)
            bias = pad if bias is None else bias + pad
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if need_weights:
            raise NotImplementedError(
                "pyllm.nn.MultiheadAttention: need_weights=True is not supported (pyllm never "
                "forms the attention matrix); call it with need_weights=False")
        if self.dropout > 0 and self.training:
            raise NotImplementedError("pyllm.nn.MultiheadAttention: attention dropout is not "
                                      "supported; use dropout=0 or eval()")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, q_len, _ = query.shape
        k_len = key.shape[1]
        wq, wk, wv = self._weights()
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        h, d = self.num_heads, self.head_dim
        q = pyllm.linear(query, wq, bq).view(batch, q_len, h, d)
        k = pyllm.linear(key, wk, bk).view(batch, k_len, h, d)
        v = pyllm.linear(value, wv, bv).view(batch, k_len, h, d)
        bias = self._mask(attn_mask, key_padding_mask, batch, q_len, k_len)
        out = pyllm.attention(q, k, v, causal=is_causal and attn_mask is None, bias=bias)
        out = self.out_proj(out.reshape(batch, q_len, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None
