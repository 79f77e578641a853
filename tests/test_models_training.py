"""Training with pyllm.models: causal-LM (GPT-2) and masked-LM (BERT) steps
with torch.optim.AdamW matching transformers' models step for step,
torch.autocast(bfloat16) within the rule, torch.compile equal to eager,
DistributedDataParallel (gloo, 2 processes) giving the single-process
gradients, and the sliding-window perplexity matching transformers'."""

import copy
import math
import os

import pytest
import torch

from harness import check_rule
from processes import run_in_processes
from pyllm.models import (BertForMaskedLM, GPT2LMHeadModel, causal_lm_loss, masked_lm_loss,
                          perplexity)

transformers = pytest.importorskip("transformers")

VOCAB = 101


def hf_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def hf_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config)


def tokens(batch=4, seq=24, seed=7):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def mlm_batch(seed=7):
    ids = tokens(seed=seed)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.25
    labels[pick] = ids[pick]
    masked = ids.masked_fill(pick, 1)  # 1 stands for [MASK]
    return masked, labels


def gpt2_losses():
    ids = tokens()
    return (lambda m: causal_lm_loss(m(ids), ids),
            lambda m: m(ids, labels=ids).loss)


def bert_losses():
    ids, labels = mlm_batch()
    return (lambda m: masked_lm_loss(m(ids), labels),
            lambda m: m(ids, labels=labels).loss)


# name: (transformers model factory, pyllm class, (pyllm loss, transformers loss))
MODELS = {"gpt2-causal-lm": (hf_gpt2, GPT2LMHeadModel, gpt2_losses),
          "bert-masked-lm": (hf_bert, BertForMaskedLM, bert_losses)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_adamw_steps_match_transformers(name):
    """Five AdamW steps in float32 against the same steps of transformers' model
    in float64 (the truth), by the rule with transformers' float32 run as
    PyTorch's error. Adam divides each gradient by its running RMS, so an
    element whose gradient is near zero takes steps set by rounding: float32
    runs of the same model differ there by a few 1e-5 after five steps at
    lr=3e-3, and the measure is the distance from float64, not from another
    float32 run."""
    make_hf, cls, losses = MODELS[name]
    hf = make_hf().train()
    ours = cls.from_hf(hf).train()
    hf64 = copy.deepcopy(hf).double()
    ours_loss, hf_loss = losses()
    runs = {"ours": (ours, ours_loss), "hf": (hf, hf_loss), "truth": (hf64, hf_loss)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
            for k, (m, _) in runs.items()}
    history = {k: [] for k in runs}
    for _ in range(5):
        for key, (model, loss_fn) in runs.items():
            opts[key].zero_grad()
            loss = loss_fn(model)
            loss.backward()
            opts[key].step()
            history[key].append(loss.item())
    assert history["ours"][-1] < history["ours"][0] - 0.1  # it learns
    for a, b, t in zip(history["ours"], history["hf"], history["truth"]):
        assert abs(a - t) <= 2 * abs(b - t) + 1e-5 * max(1.0, abs(t)), history
    hf_state, truth_state = hf.state_dict(), hf64.state_dict()
    checked = 0
    for key, p in ours.state_dict().items():
        if not p.is_floating_point():
            continue
        # The key bias has a zero gradient in exact arithmetic (it shifts every
        # score of a query alike), so Adam's normalised steps on its rounding
        # noise are noise in every run, float64 included: it is left out.
        if key.endswith(".key.bias"):
            continue
        pytorch, truth = hf_state[key], truth_state[key]
        if key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            pytorch, truth = pytorch.t(), truth.t()
        if key.endswith(".c_attn.bias"):
            width = p.numel() // 3
            p, pytorch, truth = (torch.cat([t[:width], t[2 * width:]]) for t in (p, pytorch, truth))
        assert torch.isfinite(p).all(), key
        check_rule(p, truth, pytorch, factor=3, what=f"parameter {key} after 5 steps")
        checked += 1
    assert checked >= 20, checked


@pytest.mark.parametrize("name", sorted(MODELS))
def test_autocast_bfloat16_step_within_the_rule(name):
    make_hf, cls, losses = MODELS[name]
    hf = make_hf().train()
    ours = cls.from_hf(hf).train()
    hf64 = copy.deepcopy(hf).double()
    ours_loss, hf_loss = losses()
    results = {}
    for key, model, loss_fn, autocast in (("ours", ours, ours_loss, True),
                                          ("hf", hf, hf_loss, True),
                                          ("truth", hf64, hf_loss, False)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model)
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        results[key] = (loss.detach().double().reshape(1), grads)
    # The loss is one float32 number computed from bf16 logits: the rule with
    # the floor of bf16 rounding at its magnitude (2 * 2^-9 relative).
    ours_l, truth_l, hf_l = (float(results[k][0]) for k in ("ours", "truth", "hf"))
    assert abs(ours_l - truth_l) <= 2 * abs(hf_l - truth_l) + 2 ** -8 * abs(truth_l), \
        (ours_l, truth_l, hf_l)
    for key, grad in results["ours"][1].items():
        assert grad is not None and torch.isfinite(grad).all(), key
        truth, pytorch = results["truth"][1][key], results["hf"][1][key]
        if key.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            truth, pytorch = truth.t(), pytorch.t()
        check_rule(grad, truth, pytorch, factor=3, what=f"grad {key}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_compile_training_step_equals_eager(name):
    make_hf, cls, losses = MODELS[name]
    eager = cls.from_hf(make_hf()).train()
    compiled_model = copy.deepcopy(eager)
    loss_fn, _ = losses()
    torch._dynamo.reset()
    step = torch.compile(loss_fn, fullgraph=True)
    opt = torch.optim.AdamW(compiled_model.parameters(), lr=1e-3)
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    for _ in range(2):
        for model, optimizer, fn in ((eager, opt_eager, loss_fn), (compiled_model, opt, step)):
            optimizer.zero_grad()
            loss = fn(model)
            loss.backward()
            optimizer.step()
        torch.testing.assert_close(fn(compiled_model), loss_fn(eager), atol=1e-5, rtol=1e-5)
    for (key, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=key)


def _ddp_worker(rank, world, folder):
    model = GPT2LMHeadModel.from_hf(hf_gpt2()).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = tokens().chunk(world)[rank]
    causal_lm_loss(ddp(ids), ids).backward()
    torch.save({k: p.grad for k, p in model.named_parameters()},
               os.path.join(folder, f"grads{rank}.pt"))


def test_distributed_data_parallel_gradients_equal_single_process(tmp_path):
    run_in_processes(_ddp_worker, str(tmp_path))
    single = GPT2LMHeadModel.from_hf(hf_gpt2()).train()
    ids = tokens()
    causal_lm_loss(single(ids), ids).backward()  # equal halves: mean of means = mean
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for key, p in single.named_parameters():
            torch.testing.assert_close(grads[key], p.grad, atol=1e-6, rtol=1e-5, msg=key)


def test_perplexity_matches_transformers_sliding_window():
    hf = hf_gpt2().eval()
    ours = GPT2LMHeadModel.from_hf(hf)
    text = tokens(batch=1, seq=150, seed=11)[0]
    got = perplexity(ours, text, window=64, stride=24)
    # transformers' documented recipe: labels -100 over the context part
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, text.numel(), 24):
        end = min(begin + 64, text.numel())
        ids = text[begin:end][None]
        labels = ids.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(ids, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss.item() * scored, count + scored, end
        if end == text.numel():
            break
    assert count == text.numel() - 1
    assert abs(got - math.exp(nll / count)) <= 1e-4 * got
    whole = perplexity(ours, text[:64], window=64)
    assert abs(whole - math.exp(causal_lm_loss(ours(text[:64][None]), text[:64][None]).item())) \
        <= 1e-4 * whole
    with pytest.raises(ValueError, match="stride"):
        perplexity(ours, text, window=64, stride=64)
