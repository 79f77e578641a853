"""Sharding rules of pyllm's ops for ``torch.distributed.tensor`` (DTensor),
so that the ops run on DTensors under tensor, sequence and data parallelism
(``parallelize_module``, FSDP2) without gathering anything themselves.

The rules (each op under both of its names, ``pyllm::<op>`` and
``pyllm::<op>_triton``; every op also runs fully replicated):

- norms (``rms_norm``, ``layer_norm``, the ``add_`` forms): x (and residual)
  sharded on any dimension but the normalised last one; the parameters
  replicated; the statistics sharded alike. Backward: the gradient of x
  sharded alike, the parameters' gradients ``Partial`` (a sum over rows).
- ``linear``: column-wise (weight and bias sharded on out_features, x
  replicated: y sharded on its last dimension), row-wise (x sharded on its
  last dimension, weight on in_features, bias ``Partial``: y ``Partial``;
  only without an activation, which is not linear), and rows (x sharded on
  a leading dimension, parameters replicated). ``swiglu``: column-wise and
  rows. The backward ops follow their forward's layouts.
- ``attention`` (dense): batch or heads (q, k, v, and the bias and ALiBi
  slopes where they have that dimension); varlen: heads. Backward alike.
- ``cross_entropy``: rows (logits, target, loss, lse and the gradient).

Not covered: ``rotary`` (an in-place op whose mutated arguments DTensor would
silently copy when it redistributes them; with tensor parallelism, rotate the
local q and k, as ``ColwiseParallel(use_local_output=True)`` gives them) and
sharding the sequence of attention or the vocabulary of cross_entropy (both
need a collective inside the op).

:func:`register` installs them; pyllm calls it the first time one of its
faces sees a DTensor (importing DTensor costs ~0.4 s, which pyllm's import
does not pay).
"""

from __future__ import annotations

__all__ = ["SequenceParallel", "register", "replicated_like"]

_REGISTERED = False


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Partial, Replicate, Shard


def _norm_rules(fused: bool, layer: bool):
    """(y, [sum], [mean], rstd) from (x, [residual], weight, [bias], eps)."""
    Partial, Replicate, Shard = _placements()

    def rules(x, *rest):
        stats = 2 if layer else 1
        outs = 1 + (1 if fused else 0) + stats
        args = len(rest) + 1
        R = Replicate()
        tensors = 2 if fused else 1
        params = [R if p is not None else None for p in rest[tensors - 1:args - 2]]
        strategies = [([R] * outs, [R] * tensors + params + [None])]
        for d in range(x.ndim - 1):
            strategies.append(([Shard(d)] * outs, [Shard(d)] * tensors + params + [None]))
        return strategies
    return rules


def _norm_backward_rules(layer: bool):
    """(grad_x, grad_weight, [grad_bias]) from (grad_y, x, [mean], rstd,
    weight, grad_sum, mask)."""
    Partial, Replicate, Shard = _placements()

    def rules(grad_y, x, *rest):
        R = Replicate()
        stats = 2 if layer else 1
        weight, grad_sum = rest[stats], rest[stats + 1]
        outs = 3 if layer else 2
        inputs_r = [R, R] + [R] * stats + [R if weight is not None else None,
                                           R if grad_sum is not None else None, None]
        strategies = [([R] * outs, inputs_r)]
        for d in range(x.ndim - 1):
            inputs = [Shard(d), Shard(d)] + [Shard(d)] * stats + [
                R if weight is not None else None, Shard(d) if grad_sum is not None else None,
                None]
            strategies.append(([Shard(d)] + [Partial()] * (outs - 1), inputs))
        return strategies
    return rules


def _linear_rules(x, weight, bias, activation):
    Partial, Replicate, Shard = _placements()
    R, last = Replicate(), x.ndim - 1
    b = (lambda p: p if bias is not None else None)
    strategies = [([R], [R, R, b(R), None]),
                  ([Shard(last)], [R, Shard(0), b(Shard(0)), None])]
    if activation == "none":
        strategies.append(([Partial()], [Shard(last), Shard(1), b(Partial()), None]))
    strategies += [([Shard(d)], [Shard(d), R, b(R), None]) for d in range(last)]
    return strategies


def _linear_backward_rules(grad_y, x, weight, bias, activation, mask):
    Partial, Replicate, Shard = _placements()
    R, last = Replicate(), x.ndim - 1
    b = (lambda p: p if bias is not None else None)
    strategies = [([R, R, R], [R, R, R, b(R), None, None]),
                  # column-wise: grad_y sharded on out_features
                  ([Partial(), Shard(0), Shard(0)],
                   [Shard(last), R, Shard(0), b(Shard(0)), None, None])]
    if activation == "none":  # row-wise
        strategies.append(([Shard(last), Shard(1), R],
                           [R, Shard(last), Shard(1), b(Partial()), None, None]))
    strategies += [([Shard(d), Partial(), Partial()], [Shard(d), Shard(d), R, b(R), None, None])
                   for d in range(last)]
    return strategies


def _swiglu_rules(x, wg, wu, bg, bu):
    Partial, Replicate, Shard = _placements()
    R, last = Replicate(), x.ndim - 1
    b = (lambda p, t: t if p is not None else None)
    strategies = [([R], [R, R, R, b(bg, R), b(bu, R)]),
                  ([Shard(last)], [R, Shard(0), Shard(0), b(bg, Shard(0)), b(bu, Shard(0))])]
    strategies += [([Shard(d)], [Shard(d), R, R, b(bg, R), b(bu, R)]) for d in range(last)]
    return strategies


def _swiglu_backward_rules(grad_y, x, wg, wu, bg, bu, mask):
    Partial, Replicate, Shard = _placements()
    R, last = Replicate(), x.ndim - 1
    b = (lambda p, t: t if p is not None else None)
    strategies = [([R] * 5, [R, R, R, R, b(bg, R), b(bu, R), None]),
                  ([Partial(), Shard(0), Shard(0), Shard(0), Shard(0)],
                   [Shard(last), R, Shard(0), Shard(0), b(bg, Shard(0)), b(bu, Shard(0)),
                    None])]
    strategies += [([Shard(d), Partial(), Partial(), Partial(), Partial()],
                    [Shard(d), Shard(d), R, R, b(bg, R), b(bu, R), None]) for d in range(last)]
    return strategies


def _with_preact_rules(rules, kept: int):
    """The rules of a training forward that also returns ``kept``
    pre-activations (linear_with_preact, swiglu_with_preact): each placed as
    the output."""
    def with_preact(*args):
        return [(outs * (1 + kept), inputs) for outs, inputs in rules(*args)]
    return with_preact


def _from_preact_rules(rules, kept: int, at: int):
    """The rules of a backward that takes ``kept`` pre-activations at argument
    ``at`` (linear_backward_from_preact, swiglu_backward_from_preact): each
    placed as grad_y, the rest as the backward that recomputes them."""
    def from_preact(*args):
        plain = args[:at] + args[at + kept:]
        return [(outs, inputs[:at] + [inputs[0]] * kept + inputs[at:])
                for outs, inputs in rules(*plain)]
    return from_preact


def _attention_layouts(q, cu_q, bias, alibi):
    """[(q/k/v dim, lse dim, bias placement, alibi placement)] for batch and heads."""
    Partial, Replicate, Shard = _placements()
    R = Replicate()
    varlen = cu_q is not None
    layouts = []

    def bias_on(dim):
        if bias is None:
            return None
        return R if bias.shape[dim] == 1 else Shard(dim)

    def alibi_on(which):
        if alibi is None:
            return None
        if which == "heads":
            return Shard(alibi.ndim - 1)
        return Shard(0) if alibi.ndim == 2 else R

    if not varlen:
        layouts.append((0, 0, bias_on(0), alibi_on("batch")))
        layouts.append((2, 1, bias_on(1), alibi_on("heads")))
    else:
        layouts.append((1, 0, bias_on(1), alibi_on("heads")))
    return layouts


def _attention_rules(q, k, v, cu_q, cu_k, max_q, max_k, bias, scale, causal, window_left=-1,
                     window_right=-1, softcap=0.0, alibi=None, block_table=None):
    Partial, Replicate, Shard = _placements()
    R = Replicate()
    opt = (lambda t, p: p if t is not None else None)
    strategies = [([R, R], [R, R, R, opt(cu_q, R), opt(cu_k, R), None, None, opt(bias, R),
                            None, None, None, None, None, opt(alibi, R), opt(block_table, R)])]
    if block_table is not None:
        return strategies  # the pages are shared by every sequence: replicated
    for d, lse_d, bias_p, alibi_p in _attention_layouts(q, cu_q, bias, alibi):
        strategies.append(([Shard(d), Shard(lse_d)],
                           [Shard(d), Shard(d), Shard(d), opt(cu_q, R), opt(cu_k, R), None, None,
                            bias_p, None, None, None, None, None, alibi_p, None]))
    return strategies


def _attention_backward_rules(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, bias, scale,
                              causal, window_left=-1, window_right=-1, softcap=0.0, alibi=None):
    Partial, Replicate, Shard = _placements()
    R = Replicate()
    opt = (lambda t, p: p if t is not None else None)
    strategies = [([R, R, R], [R] * 6 + [opt(cu_q, R), opt(cu_k, R), None, None, opt(bias, R),
                                        None, None, None, None, None, opt(alibi, R)])]
    for d, lse_d, bias_p, alibi_p in _attention_layouts(q, cu_q, bias, alibi):
        strategies.append(([Shard(d)] * 3,
                           [Shard(d)] * 5 + [Shard(lse_d), opt(cu_q, R), opt(cu_k, R), None, None,
                                             bias_p, None, None, None, None, None, alibi_p]))
    return strategies


def _cross_entropy_rules(logits, target, ignore_index, smoothing, z_loss, softcap, want_grad):
    Partial, Replicate, Shard = _placements()
    R = Replicate()
    return [([R, R, R], [R, R, None, None, None, None, None]),
            ([Shard(0), Shard(0), Shard(0)], [Shard(0), Shard(0), None, None, None, None, None])]


def replicated_like(t, like):
    """``t`` as a replicated DTensor on ``like``'s mesh when ``like`` is a
    DTensor and ``t`` a plain tensor (index tensors such as cu_seqlens, which
    every rank holds whole); else ``t``."""
    if t is None or type(like).__name__ != "DTensor" or type(t).__name__ == "DTensor":
        return t
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


_SEQUENCE_PARALLEL = None


def SequenceParallel(*, sequence_dim: int = 1, use_local_output: bool = False):  # noqa: N802
    """torch's ``SequenceParallel`` for pyllm's norms, which also take the
    residual (``norm(x, residual)`` -> ``(y, x + residual)``): every tensor
    input is sharded on the sequence dimension (torch's passes the first
    input only, dropping the residual), and a tuple output is returned as it
    is (or each part made local with ``use_local_output``). A
    ``ParallelStyle`` for ``parallelize_module``."""
    global _SEQUENCE_PARALLEL
    if _SEQUENCE_PARALLEL is None:
        import torch
        from torch.distributed.tensor.parallel import SequenceParallel as TorchSequenceParallel

        class _SequenceParallel(TorchSequenceParallel):
            @staticmethod
            def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
                prepare = TorchSequenceParallel._prepare_input_fn
                return tuple(prepare(sequence_sharding, mod, (t,), device_mesh)
                             if isinstance(t, torch.Tensor) else t for t in inputs)

            @staticmethod
            def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
                if not use_local_output:
                    return outputs
                if isinstance(outputs, tuple):
                    return tuple(o.to_local() for o in outputs)
                return outputs.to_local()

        _SEQUENCE_PARALLEL = _SequenceParallel
    return _SEQUENCE_PARALLEL(sequence_dim=sequence_dim, use_local_output=use_local_output)


_FUSED_COLWISE = None


def FusedColwiseParallel(parts: int, **kwargs):  # noqa: N802
    """``ColwiseParallel`` for a projection whose output is ``parts`` blocks
    side by side, each split on its own: GPT-2's fused ``c_attn`` (q, k and v,
    ``parts=3``), a fused gate/up projection (``parts=2``). Plain column-wise
    sharding would hand rank 0 all of q and part of k; this style gives each
    rank its share of every block, in order, so the local output is
    ``[q_r | k_r | v_r]`` and the module splits it as it splits the whole.

    The weight ``(parts * n, k)`` and bias are sharded on rows after a
    permutation of the rows (rank-major), so the DTensor's global (full)
    tensor is that permutation of the module's weight:
    :func:`fused_rows_in_order` brings a full tensor (a gathered weight or its
    gradient) back to the module's order. Other arguments as
    ``ColwiseParallel``'s. A ``ParallelStyle`` for ``parallelize_module``."""
    global _FUSED_COLWISE
    if _FUSED_COLWISE is None:
        from torch import nn
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.parallel import ColwiseParallel

        class _FusedColwiseParallel(ColwiseParallel):
            def __init__(self, parts, **kwargs):
                super().__init__(**kwargs)
                self.parts = parts

            def _partition_linear_fn(self, name, module, device_mesh):
                world = device_mesh.size()
                for pname, param in module.named_parameters():
                    rows = param.shape[0]
                    if rows % (self.parts * world):
                        raise ValueError(
                            f"pyllm FusedColwiseParallel: {name}.{pname} has {rows} rows, not "
                            f"{self.parts} blocks that split evenly over {world} ranks")
                    ranked = param.detach().unflatten(0, (self.parts, world, -1)) \
                        .transpose(0, 1).reshape(param.shape)
                    module.register_parameter(pname, nn.Parameter(
                        distribute_tensor(ranked, device_mesh, [Shard(0)],
                                          src_data_rank=self.src_data_rank),
                        requires_grad=param.requires_grad))

        _FUSED_COLWISE = _FusedColwiseParallel
    return _FUSED_COLWISE(parts, **kwargs)


def fused_rows_in_order(full, parts: int, world: int):
    """A full (gathered) tensor of a :func:`FusedColwiseParallel` parameter,
    or its gradient, with its rows back in the module's order."""
    return full.unflatten(0, (world, parts, -1)).transpose(0, 1).reshape(full.shape)


def register() -> None:
    """Installs the sharding rules of every pyllm op (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.pyllm

    def both(name):
        return [getattr(ops, name).default, getattr(ops, name + "_triton").default]

    for name, rules in (
            ("rms_norm", _norm_rules(False, False)), ("add_rms_norm", _norm_rules(True, False)),
            ("layer_norm", _norm_rules(False, True)), ("add_layer_norm", _norm_rules(True, True)),
            ("rms_norm_backward", _norm_backward_rules(False)),
            ("layer_norm_backward", _norm_backward_rules(True)),
            ("linear", _linear_rules), ("linear_backward", _linear_backward_rules),
            ("swiglu", _swiglu_rules), ("swiglu_backward", _swiglu_backward_rules),
            ("attention", _attention_rules), ("attention_backward", _attention_backward_rules),
            ("cross_entropy", _cross_entropy_rules)):
        register_sharding(both(name))(rules)
    # The CPU training pair (one name each).
    for name, rules in (
            ("linear_with_preact", _with_preact_rules(_linear_rules, 1)),
            ("swiglu_with_preact", _with_preact_rules(_swiglu_rules, 2)),
            ("linear_backward_from_preact", _from_preact_rules(_linear_backward_rules, 1, 4)),
            ("swiglu_backward_from_preact", _from_preact_rules(_swiglu_backward_rules, 2, 6))):
        register_sharding(getattr(ops, name).default)(rules)
    _REGISTERED = True
