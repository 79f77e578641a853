"""PEFT's LoRA on a transformers LLaMA after pyllm.patch (pyllm.nn.Linear
subclasses torch.nn.Linear, so LoRA wraps it as it wraps torch's): the
trainable parameters are the unpatched model's, a few AdamW steps give the
unpatched model's losses (and LoRA weights) within float32 rounding, and
merge_and_unload folds the adapters into pyllm's modules."""

import copy

import pytest
import torch

import pyllm

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _models():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    patched = copy.deepcopy(base)
    report = pyllm.patch(patched)
    assert any(new == "pyllm.nn.Linear" for _, _, new in report.replaced)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    models = []
    for m in (base, patched):
        torch.manual_seed(1)  # the same adapter initialisation
        models.append(peft.get_peft_model(m, lora))
    return models


def _steps(model, ids, steps=4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_after_patch_trains_like_unpatched_and_merges():
    plain, patched = _models()
    trainable = lambda m: {k: tuple(p.shape) for k, p in m.named_parameters()  # noqa: E731
                           if p.requires_grad}
    assert trainable(patched) == trainable(plain) and len(trainable(plain)) == 12
    base = patched.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, pyllm.nn.Linear)
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    ours, theirs = _steps(patched, ids), _steps(plain, ids)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-4, atol=1e-5)
    assert ours[-1] < ours[0]  # it learns
    lora_weights = {k: p for k, p in plain.named_parameters() if p.requires_grad}
    for k, p in patched.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, lora_weights[k], rtol=1e-3, atol=1e-4, msg=k)
    with torch.no_grad():
        before = patched(input_ids=ids).logits
    merged = patched.merge_and_unload()
    layer = merged.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, pyllm.nn.Linear)
    assert isinstance(layer.mlp.down_proj, pyllm.nn.Linear)
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
