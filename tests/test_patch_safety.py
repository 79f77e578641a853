"""pyllm.patch never changes a model's output: over the architectures of
tests/hf_architectures.py (decoders and encoders, each with
attn_implementation "eager" and "sdpa" where the model has it), the logits or
hidden states of a left-padded batch, and greedy generation, are the same
before and after patching; what the kernels cannot honour (softcapping, sinks,
T5's relative bias, models outside transformers' attention registry, norms
that compute something else) is left alone and named in the report. Also: the
call-time fallbacks (output_attentions, attention dropout while training) and
subclasses of the torch classes."""

import sys
import warnings

import pytest
import torch
from torch import nn

import pyllm
from pyllm.nn import hf_rotary

transformers = pytest.importorskip("transformers")

from hf_architectures import ARCHITECTURES  # noqa: E402

# What the report must say was left alone, per architecture.
LEFT_ALONE = {
    "gemma": ["GemmaRMSNorm computes something else"],
    "gemma2-softcap": ["Gemma2RMSNorm computes something else"],
    "gemma3-sliding": ["Gemma3RMSNorm computes something else"],
    "bloom-alibi": ["does not route its attention through transformers' AttentionInterface"],
    "t5-encoder": ["a relative position bias (position_bias)"],
}
# Architectures whose attention pyllm takes over.
ATTENTION_LEFT_ALONE = {"bloom-alibi", "t5-encoder"}
#: Models whose apply_rotary_pos_emb is LLaMA's: their rotary runs on pyllm.rotary.
ROTARY_PATCHED = {"llama", "mistral-sliding", "qwen2", "qwen3", "gemma", "gemma2-softcap",
                  "gemma3-sliding", "starcoder2-sliding"}
#: Rotary of another form (partial, interleaved, other layouts): left alone, reported.
ROTARY_LEFT_ALONE = {"phi3", "gpt-neox", "olmo2", "gpt-oss-sinks"}


def implementations(arch):
    """The attn_implementations the architecture can be built with."""
    found = []
    for impl in ("eager", "sdpa"):
        try:
            arch.build(impl)
        except ValueError:
            continue
        found.append(impl)
    return found


PARAMS = [(arch, impl) for arch in ARCHITECTURES for impl in implementations(arch)]


def batch():
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask


def run(model, arch, ids, mask):
    if arch.model_type == "t5":
        return model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if arch.decoder else out.last_hidden_state


def close(after, before, keep):
    a, b = after[keep], before[keep]
    scale = b.abs().max().item()
    return (a - b).abs().max().item() <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize("arch, impl", PARAMS, ids=lambda p: getattr(p, "name", p))
def test_patch_keeps_outputs_and_generation(arch, impl):
    model = arch.build(impl)
    ids, mask = batch()
    keep = mask.bool()
    generate = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = run(model, arch, ids, mask)
        tokens = model.generate(ids, **generate) if arch.decoder else None
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no call-time fallback here
            report = pyllm.patch(model)
            after = run(model, arch, ids, mask)
            assert close(after, before, keep), (
                f"{arch.name} ({impl}): patched output differs by "
                f"{(after - before)[keep].abs().max().item():.3g}\n{report}")
            if arch.decoder:
                assert torch.equal(model.generate(ids, **generate), tokens), str(report)
    text = str(report)
    print(f"\n{arch.name} ({impl}):\n{text}")
    for reason in LEFT_ALONE.get(arch.name, []):
        assert reason in text, text
    patched_attention = any(old.startswith("attn_implementation") for _, old, _ in report.replaced)
    assert patched_attention == (arch.name not in ATTENTION_LEFT_ALONE), text
    assert any(new == "pyllm.nn.Linear" for _, _, new in report.replaced), text
    patched_rotary = any(new == "pyllm.rotary" for _, _, new in report.replaced)
    assert patched_rotary == (arch.name in ROTARY_PATCHED), text
    assert ("rotary left as is" in text) == (arch.name in ROTARY_LEFT_ALONE), text
    assert pyllm.unpatch(model) == len(report.replaced)
    module = sys.modules[type(model).__module__]
    swapped = getattr(getattr(module, "apply_rotary_pos_emb", None), "_pyllm_original", None)
    # put back, unless a model patched elsewhere in this process still uses it
    assert swapped is None or type(model).__module__ in hf_rotary._SWAPPED


def test_patched_rotary_runs_the_kernel_and_falls_back(monkeypatch):
    """A patched LLaMA's rotary goes through pyllm.rotary and its training
    loss through pyllm.cross_entropy (same loss and gradients as unpatched);
    a rotary call the kernel can't take (cos of another width) goes to the
    original function."""
    from transformers.models.llama import modeling_llama

    from pyllm.nn import hf_loss

    arch = next(a for a in ARCHITECTURES if a.name == "llama")
    model = arch.build("sdpa")
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    loss0 = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss0.backward()
    grads0 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    original = modeling_llama.apply_rotary_pos_emb
    report = pyllm.patch(model, linear=False, norms=False, attention=False)
    assert model.loss_function is hf_loss.causal_lm_loss, str(report)
    calls = []
    real = pyllm.rotary
    monkeypatch.setattr(pyllm, "rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss1 = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss1.backward()
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if n in grads0:
            torch.testing.assert_close(p.grad, grads0[n], rtol=1e-4, atol=1e-6)
    swapped = modeling_llama.apply_rotary_pos_emb
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)  # half width: not a layout it takes
    calls.clear()
    with pytest.raises(RuntimeError):  # what the original itself does with these
        swapped(q, k, cos, sin)
    assert not calls
    pyllm.unpatch(model)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert model.loss_function is not hf_loss.causal_lm_loss


@pytest.mark.parametrize("name, feature, off", [("gpt-oss-sinks", "sinks", None),
                                                 ("gemma2-softcap", "softcap", 0.0)])
def test_the_honoured_features_bite(name, feature, off, monkeypatch):
    """The patched model with the kernel told to ignore the sinks (or the
    softcap) gives other logits: the comparison above would see a patch
    that ignored them."""
    arch = next(a for a in ARCHITECTURES if a.name == name)
    model = arch.build("eager")
    ids, mask = batch()
    with torch.no_grad():
        before = run(model, arch, ids, mask)
        pyllm.patch(model)
        assert close(run(model, arch, ids, mask), before, mask.bool())
        real = pyllm.attention
        monkeypatch.setattr(pyllm, "attention", lambda *a, **k: real(*a, **{**k, feature: off}))
        forced = run(model, arch, ids, mask)
    assert not close(forced, before, mask.bool())


#: Architectures with sliding-window layers whose modules pass the window.
WINDOWED = ["mistral-sliding", "gemma2-softcap", "gemma3-sliding", "starcoder2-sliding",
            "gpt-oss-sinks"]


def unpadded():
    """Two sequences of 12 tokens, no padding: longer than the window (4)."""
    return torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(2))


def generations(model, ids):
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    return [model.generate(ids, **settings),
            model.generate(ids, cache_implementation="static", **settings)]


WINDOWED_PARAMS = [(arch.name, impl) for arch in ARCHITECTURES if arch.name in WINDOWED
                   for impl in implementations(arch)]


@pytest.mark.parametrize("name, impl", WINDOWED_PARAMS)
def test_sliding_window_runs_in_the_kernel(name, impl, monkeypatch):
    """With no padding, a sliding-window layer's mask is left out and the
    kernel applies the window (and Gemma 2's softcap under eager): the
    logits, and greedy tokens with a dynamic and a static cache, are the
    unpatched model's; the kernel was called with a window and no mask."""
    from pyllm.nn import hf_attention

    arch = next(a for a in ARCHITECTURES if a.name == name)
    model = arch.build(impl)
    ids = unpadded()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        tokens = generations(model, ids)
        report = pyllm.patch(model)
        assert hf_attention.window_in_kernel(model), str(report)
        calls = []
        real = pyllm.attention

        def spy(*args, **kwargs):
            calls.append((kwargs.get("bias") is None, kwargs.get("window_size"),
                          kwargs.get("softcap")))
            return real(*args, **kwargs)

        monkeypatch.setattr(pyllm, "attention", spy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            after = model(input_ids=ids).logits
            assert close(after, before, torch.ones_like(ids, dtype=torch.bool)), (
                f"differs by {(after - before).abs().max().item():.3g}\n{report}")
            assert any(no_mask and window == (3, 0) for no_mask, window, _ in calls), calls
            if name == "gemma2-softcap":
                assert {cap for *_, cap in calls} == {0.0 if impl == "sdpa" else 2.0}, calls
                assert ("sdpa ignores it" in str(report)) == (impl == "sdpa"), str(report)
            for got, want in zip(generations(model, ids), tokens):
                assert torch.equal(got, want), str(report)
        # The test has power: the same run without the window (or without
        # the softcap) changes the logits.
        monkeypatch.setattr(pyllm, "attention",
                            lambda *a, **k: real(*a, **{**k, "window_size": (-1, -1)}))
        assert not close(model(input_ids=ids).logits, before, torch.ones_like(ids, dtype=torch.bool))
        if name == "gemma2-softcap" and impl == "eager":
            monkeypatch.setattr(pyllm, "attention", lambda *a, **k: real(*a, **{**k, "softcap": 0.0}))
            assert not close(model(input_ids=ids).logits, before,
                             torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3"])
def test_static_cache_prefill_is_causal_from_the_top_left(name):
    """A static cache's prefill gets no mask and more keys (the cache's
    length) than queries: causal from the top-left corner, as sdpa's
    is_causal. Greedy tokens with a static cache are the unpatched ones."""
    arch = next(a for a in ARCHITECTURES if a.name == name)
    model = arch.build("sdpa")
    ids = unpadded()
    with torch.no_grad():
        tokens = generations(model, ids)
        report = pyllm.patch(model)
        for got, want in zip(generations(model, ids), tokens):
            assert torch.equal(got, want), str(report)


def test_sinks_train_as_unpatched():
    """gpt-oss in training mode: the loss and every parameter's gradient (the
    sinks' among them) are the unpatched model's."""
    arch = next(a for a in ARCHITECTURES if a.name == "gpt-oss-sinks")
    model = arch.build("eager").train()
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    loss0, grads0 = loss_and_grads()
    assert any(n.endswith("sinks") and g.abs().max() > 0 for n, g in grads0.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no call-time fallback
        report = pyllm.patch(model)
        loss1, grads1 = loss_and_grads()
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys(), str(report)
    for n in grads0:
        scale = grads0[n].abs().max().item()
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-5 * max(1.0, scale),
                                   msg=n)


def test_a_window_the_modules_do_not_pass_keeps_the_mask():
    """A sliding-window model whose attention modules pass no window (or
    another one) keeps transformers' dense mask: window_in_kernel is False,
    and the patched logits are still the unpatched ones."""
    from pyllm.nn import hf_attention

    arch = next(a for a in ARCHITECTURES if a.name == "gemma2-softcap")
    model = arch.build("eager")
    for module in model.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = 5  # not the config's 4
    ids = unpadded()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        pyllm.patch(model)
        assert not hf_attention.window_in_kernel(model)
        after = model(input_ids=ids).logits
    assert close(after, before, torch.ones_like(ids, dtype=torch.bool))


def llama_arch():
    return next(a for a in ARCHITECTURES if a.name == "llama")


def test_output_attentions_falls_back_to_the_original_implementation():
    arch = llama_arch()
    model = arch.build("eager")
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        pyllm.patch(model)
        with pytest.warns(RuntimeWarning, match="output_attentions"):
            got = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    assert close(got.logits, want.logits, keep)
    for a, b in zip(got.attentions, want.attentions):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_dropout_while_training_falls_back(impl):
    arch = next(a for a in ARCHITECTURES if a.name == "bert")
    model = arch.build(impl)
    model.config.attention_probs_dropout_prob = 0.5
    for m in model.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.5
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = 0.5
    model.train()
    ids, mask = batch()
    torch.manual_seed(5)
    want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pyllm.patch(model)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="dropout"):
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert close(got, want, mask.bool())
    model.eval()  # no dropout: the kernel, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(input_ids=ids, attention_mask=mask)


def test_subclasses_and_look_alikes_are_left_alone_and_reported():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class OnePlusRMSNorm(nn.Module):  # Gemma's kind: weight stored as an offset from 1
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = ScaledLinear(8, 8)
            self.norm = OnePlusRMSNorm(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.norm(self.proj(x)))

    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 8)
    before = model(x)
    report = pyllm.patch(model)
    assert torch.allclose(model(x), before, atol=1e-6)
    assert [name for name, _, _ in report.replaced] == ["head"]
    reasons = dict(report.skipped)
    assert "ScaledLinear subclasses torch.nn.Linear with its own forward" in reasons["proj"]
    assert "OnePlusRMSNorm computes something else" in reasons["norm"]


def test_an_empty_model_on_the_meta_device_is_judged_too():
    """Models built with empty weights (to load a checkpoint into later): the
    RMSNorm run happens on the CPU, so Gemma's norms are still left alone."""
    config = transformers.GemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)
    with torch.device("meta"):
        model = transformers.GemmaForCausalLM(config)
    report = pyllm.patch(model)
    assert "GemmaRMSNorm computes something else" in str(report)
    assert not any(old == "GemmaRMSNorm" for _, old, _ in report.replaced)
