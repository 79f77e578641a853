"""A LLaMA-style decoder stack in one call of ``pyllm._C``, for packed CPU
inference (:func:`llama_layers`).

After ``model.pack_for_inference()``, a decode step of
:class:`pyllm.models.LlamaForCausalLM` runs nine kernels per layer; the
Python between them (module calls, attribute reads, the packed modules'
checks) is most of a small model's step and ~6% of a 1.1B model's. Here the
layers' arguments are read from the modules once per call and
``pyllm._C.decoder_layers_direct`` runs the same kernels with the same
arguments in the modules' order, with the GIL released: the outputs and the
KV caches are those of the modules, bit for bit.

The call takes this path only when the modules would run exactly those
kernels, and returns None otherwise (the caller then runs the modules):

- no gradient mode (``torch.no_grad()``, ``inference_mode()``: ``generate``),
  the default or ``cpu`` backend, plain CPU tensors, not traced or compiled,
  no autocast, dispatch mode or profiler (``pyllm._C`` checks those);
- every layer, norm, attention, MLP and projection of exactly pyllm's
  classes, with no forward hook (its own or global) and no replaced
  ``forward``;
- attention: causal self-attention with rotary embeddings, no window,
  softcap, ALiBi or sinks; every projection packed (``pack_for_inference``)
  for x's dtype, on a path that reads the packed copy for these rows
  (:func:`pyllm.nn.packing.packed_serves_rows`);
- :class:`pyllm.nn.KVCache` caches of x's dtype and batch, all of one length,
  with room for the new tokens; no attention mask or explicit positions.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules import module as _module

from pyllm import _C
from pyllm.nn.attention import Attention, KVCache, RotaryEmbedding
from pyllm.nn.linear import Linear, SwiGLU
from pyllm.nn.norm import RMSNorm
from pyllm.invariance import is_batch_invariant
from pyllm.nn.packing import SKINNY_ROWS, _state, packed_call_allowed, packed_serves_rows

__all__ = ["llama_layers"]

_decoder_layers_direct = _C.decoder_layers_direct
_has_torch_function = torch._C._has_torch_function
_tracing = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling


def _global_hooks() -> bool:
    """Whether a global module hook is registered (every module call runs it)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or
                _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _hooked(module) -> bool:
    """Whether calling ``module`` does more than its forward: a hook of its
    own, or a ``forward`` set on the instance."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or
                module._backward_pre_hooks or "forward" in module.__dict__)


def _plain(module, kind) -> bool:
    """Whether ``module`` is exactly ``kind`` and its call is its forward."""
    return type(module) is kind and not _hooked(module)


def _packed(proj: Linear, x: torch.Tensor, weights: list):
    """The packed panels of a projection for x (its ``forward`` would read
    them), or None."""
    pack = proj._pack
    if pack is None or proj.activation != "none":
        return None
    weights.append(proj.weight)
    packed = pack.get(proj.weight)
    if packed is None or packed.dtype != x.dtype or not packed_serves_rows(x, packed):
        return None
    return packed


def _linear_bias(proj: Linear, x: torch.Tensor):
    """``proj``'s bias as ``Linear.forward`` passes it (float32 kept)."""
    bias = proj.bias
    return bias if bias is None or bias.dtype in (x.dtype, torch.float32) else bias.to(x.dtype)


def _layer_args(layer, x: torch.Tensor, weights: list, shape: list):
    """The part of the tuple ``pyllm._C.decoder_layers_direct`` takes for one
    layer (see csrc/decoder_direct.cpp) that does not change from call to
    call (its first 15 fields), and the rotary embedding's ``interleaved``;
    or None when the layer must run as modules."""
    from pyllm.models.llama import LlamaDecoderLayer

    if not _plain(layer, LlamaDecoderLayer):
        return None
    norm1, attn = layer.input_layernorm, layer.self_attn
    norm2, mlp = layer.post_attention_layernorm, layer.mlp
    if not (_plain(norm1, RMSNorm) and _plain(attn, Attention) and _plain(norm2, RMSNorm)
            and _plain(mlp, SwiGLU)):
        return None
    hidden = (x.shape[-1],)
    if norm1.normalized_shape != hidden or norm2.normalized_shape != hidden:
        return None
    rotary, o_proj = attn.rotary, attn.o_proj
    if (type(rotary) is not RotaryEmbedding or not attn.causal or attn._qkv_pack is None
            or attn.window_size != (-1, -1) or attn.softcap != 0.0
            or attn.alibi_slopes is not None or attn.sinks is not None
            or not _plain(o_proj, Linear)):
        return None
    # the heads from the projections' widths, as Attention.forward's views
    heads = (attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim,
             attn.head_dim)
    if shape and tuple(shape) != heads:
        return None
    shape[:] = heads
    qkv_weights = attn._qkv_weights()
    weights.extend(qkv_weights)
    qkv = attn._qkv_pack.get(*qkv_weights)
    if qkv is None or qkv.dtype != x.dtype or not packed_serves_rows(x, qkv):
        return None
    qkv_bias = attn._qkv_bias(x, qkv_weights,
                              [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)])
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if not _plain(down, Linear) or gate._pack is None or up._pack is None:
        return None
    packed = [_packed(proj, x, weights) for proj in (o_proj, gate, up, down)]
    if any(p is None for p in packed):
        return None
    # the widths the modules' views and products take (the C++ side checks
    # the panels' shapes, which round some widths up)
    hidden, q_out, kv_out = x.shape[-1], heads[0] * heads[2], heads[1] * heads[2]
    inner = packed[1].out_features
    widths = ((qkv, q_out + 2 * kv_out, hidden), (packed[0], hidden, q_out),
              (packed[1], inner, hidden), (packed[2], inner, hidden), (packed[3], hidden, inner))
    if (attn.q_proj.out_features != q_out or attn.k_proj.out_features != kv_out
            or attn.v_proj.out_features != kv_out
            or any((p.out_features, p.in_features) != (n, k) for p, n, k in widths)):
        return None
    cast = (lambda p: p if p is None or p.dtype == x.dtype else p.to(x.dtype))  # as SwiGLU
    weights.extend((norm1.weight, norm2.weight))
    return (norm1.weight, norm1.eps, qkv.panels, qkv_bias, packed[0].panels,
            _linear_bias(o_proj, x), norm2.weight, norm2.eps, packed[1].panels,
            packed[2].panels, cast(gate.bias), cast(up.bias), packed[1].out_features,
            packed[3].panels, _linear_bias(down, x)), rotary.interleaved


def _fingerprint(layer, context):
    """Everything :func:`_layer_args` reads of the layer besides the cache and
    the rotary tables, as ``(key, objects)``: the key holds plain values
    (ids of the modules, packed copies and parameters; their classes, hooks
    and settings; each parameter's version, address, dtype, shape and
    strides), ``objects`` the objects whose ids it holds (kept alive with the
    key, so an equal id is the same object). Equal keys give equal
    arguments. None when a change could not be seen (a parameter without a
    version counter: an inference tensor) or a module is missing. Reads the
    modules' dictionaries directly (``nn.Module.__getattr__`` is slow)."""
    sub = layer._modules
    norm1, attn = sub.get("input_layernorm"), sub.get("self_attn")
    norm2, mlp = sub.get("post_attention_layernorm"), sub.get("mlp")
    if attn is None or mlp is None or norm1 is None or norm2 is None:
        return None
    heads, ffn = attn._modules, mlp._modules
    projs = (heads.get("q_proj"), heads.get("k_proj"), heads.get("v_proj"), heads.get("o_proj"),
             ffn.get("gate_proj"), ffn.get("up_proj"), ffn.get("down_proj"))
    rotary = heads.get("rotary")
    if any(p is None for p in projs) or rotary is None:
        return None
    called = (layer, norm1, attn, norm2, mlp, projs[3], projs[6])
    if any(_hooked(m) for m in called):
        return None
    packs = (attn.__dict__.get("_qkv_pack"),) + tuple(p.__dict__.get("_pack") for p in projs[3:])
    params = [norm1._parameters.get("weight"), norm2._parameters.get("weight"),
              attn._buffers.get("alibi_slopes"), attn.__dict__.get("sinks"),
              attn._parameters.get("sinks")]
    for p in projs:
        params += (p._parameters.get("weight"), p._parameters.get("bias"))
    states = []
    for t in params:
        if t is not None:
            state = _state(t)
            if state is None:
                return None
            states.append(state)
    objects = (*called[1:], rotary, *projs, *packs, *(p.packed for p in packs if p is not None),
               *params)
    key = (context, tuple(map(id, objects)), tuple(map(type, called)), type(rotary),
           rotary.interleaved, norm1.normalized_shape, norm1.eps, norm2.normalized_shape,
           norm2.eps, attn.causal, attn.window_size, attn.softcap, attn.head_dim,
           projs[3].activation, projs[6].activation, tuple(states))
    return key, objects


# layer -> (fingerprint key, the objects it names, the layer's arguments but
# the cache's and rotary tables, interleaved, (heads, heads_kv, head_dim));
# the layer itself is only the weak key (its plan dies with it)
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached_layer_args(layer, cache, x, context, shape):
    """:func:`_layer_args`, its static part kept per layer while the
    layer's fingerprint holds."""
    if type(cache) is not KVCache:
        return None
    fingerprint = _fingerprint(layer, context)
    if fingerprint is None:
        return None
    key, objects = fingerprint
    plan = _PLANS.get(layer)
    if plan is None or plan[0] != key:
        weights = []
        args = _layer_args(layer, x, weights, shape)
        if args is None or _has_torch_function(weights):
            _PLANS.pop(layer, None)
            return None
        fingerprint = _fingerprint(layer, context)  # after any packing again
        if fingerprint is None:
            return None
        key, objects = fingerprint
        plan = _PLANS[layer] = (key, objects, *args, tuple(shape))
    elif shape and tuple(shape) != plan[4]:
        return None
    shape[:] = plan[4]
    cos, sin = layer._modules["self_attn"]._modules["rotary"].tables(
        cache.length + x.shape[1], x.device)
    return plan[2] + (cos, sin, plan[3], cache.keys, cache.values)


def llama_layers(layers, x: torch.Tensor, caches: list):
    """The decoder layers of a LLaMA-style model over x in one call, or None.

    Args:
        layers: the model's :class:`pyllm.models.llama.LlamaDecoderLayer` list.
        x: ``(batch, seq, hidden)`` float32/bfloat16/float16, the embedded
            tokens (the first layer's input, no residual yet).
        caches: one :class:`pyllm.nn.KVCache` per layer; each gets the seq new
            keys and values and its ``length`` advanced, as the layers would.

    Returns:
        ``(x, residual)`` after the last layer, each ``(batch, seq, hidden)``
        in x's dtype, exactly the layers' outputs; or None, with nothing
        changed, when the call must run the layers as modules (see the
        module docstring).
    """
    if (_is_compiling() or torch.is_grad_enabled() or not caches or len(caches) != len(layers)
            or _global_hooks() or _tracing() is not None or not packed_call_allowed(x)):
        return None
    length = caches[0].length
    shape, args = [], []
    # what the packed paths' choices depend on besides the modules
    context = (x.dtype, x.numel() // x.shape[-1] > SKINNY_ROWS if x.shape[-1] else True,
               is_batch_invariant())
    for layer, cache in zip(layers, caches):
        if cache.length != length:
            return None
        layer_args = _cached_layer_args(layer, cache, x, context, shape)
        if layer_args is None:
            return None
        args.append(layer_args)
    out = _decoder_layers_direct(x, None, args, length, *shape)
    if out is not None:
        for cache in caches:
            cache.length += x.shape[1]
    return out
