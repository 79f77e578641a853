"""pyllm's ops on DTensors (torch.distributed.tensor, the sharding rules of
pyllm/distributed.py) in two real processes (gloo): each op, forward and
backward, under every layout its rules name, gives the single-process
result, and keeps the layout (the output's placements are the rule's: no
silent gather). Then pyllm's LLaMA and GPT-2 under parallelize_module
(tensor parallelism, with and without sequence parallelism) and FSDP2 give
the single-process logits and gradients."""

import os

import pytest
import torch
from processes import run_in_processes

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _close(ours, theirs, what):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=what)


def _check(fn, tensors, placements, mesh, expected_out, what, constants=()):
    """fn on DTensors laid out by ``placements`` against fn on the tensors:
    outputs (and their placements, when given), and the gradient of every
    floating input but those at the indices ``constants``."""
    from torch.distributed.tensor import distribute_tensor

    grads = [t.is_floating_point() and i not in constants for i, t in enumerate(tensors)]
    locals_ = [t.clone().requires_grad_(g) for t, g in zip(tensors, grads)]
    dist = [distribute_tensor(t, mesh, [p]).requires_grad_(g)
            for t, p, g in zip(tensors, placements, grads)]
    ours, theirs = fn(*dist), fn(*locals_)
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    for i, (o, t, e) in enumerate(zip(ours, theirs, expected_out)):
        if e is not None:
            assert tuple(o.placements) == (e,), f"{what}: output {i} is {o.placements}, not {e}"
        _close(o.full_tensor(), t, f"{what}: output {i}")
    grad = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i))
            for i, t in enumerate(theirs)]
    torch.autograd.backward(theirs[0], grad[0])
    from torch.distributed.tensor import distribute_tensor as dt

    torch.autograd.backward(ours[0], dt(grad[0], mesh, list(ours[0].placements))
                            if not any(p.is_partial() for p in ours[0].placements)
                            else dt(grad[0], mesh, [torch.distributed.tensor.Replicate()]))
    for i, (d, t) in enumerate(zip(dist, locals_)):
        if t.grad is not None:
            _close(d.grad.full_tensor(), t.grad, f"{what}: grad of input {i}")


def _ops_worker(rank, world):
    import pyllm
    from torch.distributed.tensor import Partial, Replicate, Shard, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    R = Replicate()
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    x, r, w, b = randn(6, 10, 32), randn(6, 10, 32), randn(32), randn(32)
    for d in (0, 1):
        s = Shard(d)
        _check(lambda x, w: pyllm.rms_norm(x, w, 1e-6), [x, w], [s, R], mesh, [s],
               f"rms_norm {s}")
        _check(lambda x, r, w: pyllm.add_rms_norm(x, r, w, 1e-6), [x, r, w], [s, s, R], mesh,
               [s, s], f"add_rms_norm {s}")
        _check(lambda x, w, b: pyllm.layer_norm(x, w, b, 1e-5), [x, w, b], [s, R, R], mesh,
               [s], f"layer_norm {s}")
        _check(lambda x, r, w, b: pyllm.add_layer_norm(x, r, w, b, 1e-5), [x, r, w, b],
               [s, s, R, R], mesh, [s, s], f"add_layer_norm {s}")
    wl, bl = randn(48, 32) * 0.2, randn(48)
    for act in ("none", "gelu_tanh", "silu"):
        _check(lambda x, w, b: pyllm.linear(x, w, b, act), [x, wl, bl], [R, Shard(0), Shard(0)],
               mesh, [Shard(2)], f"linear column-wise {act}")
        _check(lambda x, w, b: pyllm.linear(x, w, b, act), [x, wl, bl], [Shard(0), R, R],
               mesh, [Shard(0)], f"linear rows {act}")
    _check(lambda x, w, b: pyllm.linear(x, w, b), [x, wl, bl], [Shard(2), Shard(1), R], mesh,
           [Partial()], "linear row-wise")
    wg, wu = randn(40, 32) * 0.2, randn(40, 32) * 0.2
    _check(lambda x, a, c: pyllm.swiglu(x, a, c), [x, wg, wu], [R, Shard(0), Shard(0)], mesh,
           [Shard(2)], "swiglu column-wise")
    _check(lambda x, a, c: pyllm.swiglu(x, a, c), [x, wg, wu], [Shard(1), R, R], mesh,
           [Shard(1)], "swiglu rows")
    q, k, v = randn(4, 9, 4, 16), randn(4, 13, 2, 16), randn(4, 13, 2, 16)
    slopes = randn(4).abs() * 0.1
    for d in (0, 2):
        s = Shard(d)
        _check(lambda q, k, v: pyllm.attention(q, k, v, causal=True), [q, k, v], [s, s, s],
               mesh, [s], f"attention {s}")
        _check(lambda q, k, v, a: pyllm.attention(q, k, v, causal=True, window_size=(5, 0),
                                                  softcap=3.0, alibi_slopes=a),
               [q, k, v, slopes], [s, s, s, Shard(0) if d == 2 else R], mesh, [s],
               f"attention variants {s}", constants=(3,))
    cu_q = torch.tensor([0, 5, 9, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 30], dtype=torch.int32)
    qv, kv, vv = randn(20, 4, 16), randn(30, 2, 16), randn(30, 2, 16)
    _check(lambda q, k, v: pyllm.attention_varlen(q, k, v, cu_q.clone(), cu_k.clone(),
                                                  causal=True),
           [qv, kv, vv], [Shard(1)] * 3, mesh, [Shard(1)], "attention_varlen heads")
    logits, target = randn(12, 50), torch.randint(0, 50, (12,), generator=g)
    _check(lambda z, t: pyllm.cross_entropy(z, t, reduction="none"), [logits, target],
           [Shard(0), Shard(0)], mesh, [Shard(0)], "cross_entropy rows")
    # the ops that write into their inputs have no rule: a clear error
    from torch.distributed.tensor import distribute_tensor

    cos, sin = pyllm.rotary_tables(16, 16)
    with pytest.raises(TypeError, match="DTensor"):
        pyllm.rotary(distribute_tensor(q, mesh, [Shard(2)]), distribute_tensor(k, mesh, [Shard(2)]),
                     cos, sin)


def test_ops_on_dtensors_equal_single_process():
    run_in_processes(_ops_worker)


def _tp_plan(model, sequence: bool):
    """Megatron-style tensor parallelism of a pyllm LLaMA or GPT-2: q/k/v and
    the MLP's first projections column-wise (GPT-2's fused c_attn with
    pyllm.distributed.FusedColwiseParallel), the output projections row-wise
    (heads and MLP columns split). With ``sequence``, sequence parallelism
    too: the residual stream and the norms sharded on the sequence between the
    attention and MLP blocks (the embeddings row-wise with a sequence-sharded
    output, the LM head column-wise from it)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from pyllm.distributed import FusedColwiseParallel, SequenceParallel

    seq = dict(input_layouts=Shard(1)) if sequence else {}
    out = dict(output_layouts=Shard(1), use_local_output=False) if sequence else {}
    embed = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                            use_local_output=False)
    head = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    plan = {}
    if hasattr(model, "model"):  # LLaMA
        if sequence:
            plan.update({"model.embed_tokens": embed, "model.norm": SequenceParallel(),
                         "lm_head": head})
        for i in range(len(model.model.layers)):
            p = f"model.layers.{i}."
            plan.update({p + "self_attn.q_proj": ColwiseParallel(**seq),
                         p + "self_attn.k_proj": ColwiseParallel(**seq),
                         p + "self_attn.v_proj": ColwiseParallel(**seq),
                         p + "self_attn.o_proj": RowwiseParallel(**out),
                         p + "mlp.gate_proj": ColwiseParallel(**seq),
                         p + "mlp.up_proj": ColwiseParallel(**seq),
                         p + "mlp.down_proj": RowwiseParallel(**out)})
            if sequence:
                plan.update({p + "input_layernorm": SequenceParallel(),
                             p + "post_attention_layernorm": SequenceParallel()})
        return plan
    if sequence:  # GPT-2: token and position embeddings, both sequence-sharded
        plan.update({"transformer.wte": embed, "transformer.wpe": embed,
                     "transformer.ln_f": SequenceParallel(), "lm_head": head})
    for i in range(len(model.transformer.h)):
        p = f"transformer.h.{i}."
        plan.update({p + "attn.c_attn": FusedColwiseParallel(3, **seq),
                     p + "attn.c_proj": RowwiseParallel(**out),
                     p + "mlp.c_fc": ColwiseParallel(**seq),
                     p + "mlp.c_proj": RowwiseParallel(**out)})
        if sequence:
            plan.update({p + "ln_1": SequenceParallel(), p + "ln_2": SequenceParallel()})
    return plan


def _llama():
    import transformers

    from pyllm.models import LlamaForCausalLM

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM.from_hf(transformers.LlamaForCausalLM(config))


def _tp_model(name):
    # GPT-2 with its LM head apart from the token embedding (sequence
    # parallelism shards the two on different dimensions)
    return _llama() if name == "llama" else _gpt2(tie_word_embeddings=False)


def _tp_worker(rank, world, folder, sequence, name="llama"):
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from pyllm.distributed import fused_rows_in_order
    from pyllm.models import causal_lm_loss

    model = _tp_model(name).train()
    mesh = init_device_mesh("cpu", (world,))
    plan = _tp_plan(model, sequence)
    parallelize_module(model, mesh, plan)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    causal_lm_loss(logits, ids).backward()
    grads = {}
    for k, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if type(plan.get(k.rsplit(".", 1)[0])).__name__ == "_FusedColwiseParallel":
            g = fused_rows_in_order(g, 3, world)
        grads[k] = g
    if rank == 0:
        torch.save({"logits": logits.detach(), "grads": grads},
                   os.path.join(folder, "tp.pt"))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("sequence", [False, True], ids=["tensor", "tensor+sequence"])
def test_under_tensor_parallelism_equals_single_process(tmp_path, sequence, name):
    """parallelize_module with ColwiseParallel / RowwiseParallel (GPT-2's fused
    QKV with FusedColwiseParallel; SequenceParallel on the norms, the residual
    stream sharded on the sequence) on pyllm.nn modules (subclasses of the
    torch classes, so the plans take them): the logits and every parameter's
    gradient of the single process."""
    pytest.importorskip("transformers")
    from pyllm.models import causal_lm_loss

    run_in_processes(_tp_worker, str(tmp_path), sequence, name)
    got = torch.load(tmp_path / "tp.pt")
    single = _tp_model(name).train()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = single(ids)
    causal_lm_loss(logits, ids).backward()
    _close(got["logits"], logits.detach(), "logits")
    for key, p in single.named_parameters():
        _close(got["grads"][key], p.grad, f"grad {key}")


def _gpt2(**options):
    import transformers

    from pyllm.models import GPT2LMHeadModel

    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, **options)
    torch.manual_seed(0)
    return GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(config))


def _blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _fsdp_worker(rank, world, folder, compiled, name="llama"):
    from torch.distributed.fsdp import fully_shard

    from pyllm.models import causal_lm_loss

    model = (_llama() if name == "llama" else _gpt2()).train()
    for layer in _blocks(model):
        fully_shard(layer)
    fully_shard(model)
    run = torch.compile(model) if compiled else model
    ids = torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(1))
    causal_lm_loss(run(ids.chunk(world)[rank]), ids.chunk(world)[rank]).backward()
    grads = {k: p.grad.full_tensor() for k, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, os.path.join(folder, "fsdp.pt"))


@pytest.mark.parametrize("name,compiled", [("llama", False), ("llama", True), ("gpt2", False),
                                           ("gpt2", True)],
                         ids=["llama", "llama-torch.compile", "gpt2", "gpt2-torch.compile"])
def test_under_fsdp2_equals_single_process(tmp_path, name, compiled):
    """FSDP2 (fully_shard per block and at the root; GPT-2's tied embedding
    and head at the root), each rank half the batch: every parameter's
    gradient (gathered) is the single process's on the whole batch (equal
    halves: the mean of the means is the mean)."""
    pytest.importorskip("transformers")
    from pyllm.models import causal_lm_loss

    run_in_processes(_fsdp_worker, str(tmp_path), compiled, name)
    got = torch.load(tmp_path / "fsdp.pt")
    single = (_llama() if name == "llama" else _gpt2()).train()
    ids = torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(1))
    causal_lm_loss(single(ids), ids).backward()
    for key, p in single.named_parameters():
        _close(got[key], p.grad, f"grad {key}")
