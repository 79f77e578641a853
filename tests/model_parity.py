"""Shared checks of pyllm.models against Hugging Face models: outputs and the
gradient of every parameter under the harness rule, with the Hugging Face
model in float64 as the truth and in the test dtype as PyTorch's answer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import check_rule


def left_padded_prompts(vocab: int, batch: int = 2, length: int = 9, pad: int = 3, seed: int = 3):
    """``(ids, mask)``: random tokens, the second prompt left-padded by ``pad``."""
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def outputs_and_grads(model, call, keep, target):
    """Runs ``call(model)`` -> outputs ``(batch, seq, n)``, backpropagates a
    cross-entropy of the kept positions against ``target``, and returns
    (kept outputs, {parameter name: gradient})."""
    model.zero_grad()
    out = call(model)
    F.cross_entropy(out[keep].float(), target[keep]).backward()
    return out[keep].detach(), {k: p.grad for k, p in model.named_parameters()}


def check_against_hf(ours, hf, call_ours, call_hf, keep, target, *, what="logits",
                     transposed=lambda key: False):
    """Outputs and every parameter's gradient of ``ours`` within the rule of
    ``hf`` (truth: a float64 copy of hf). Parameter names must agree;
    ``transposed(name)``: hf stores that weight ``(in, out)`` (GPT-2 Conv1D)."""
    hf64 = copy.deepcopy(hf).double()
    ours_out, ours_grads = outputs_and_grads(ours, call_ours, keep, target)
    hf_out, hf_grads = outputs_and_grads(hf, call_hf, keep, target)
    truth_out, truth_grads = outputs_and_grads(hf64, call_hf, keep, target)
    assert not torch.isnan(ours_out).any()
    check_rule(ours_out, truth_out, hf_out, what=what)
    assert ours_grads.keys() <= hf_grads.keys(), sorted(ours_grads.keys() - hf_grads.keys())
    for key, grad in ours_grads.items():
        if hf_grads[key] is None:  # unused by the loss in HF too (e.g. the pooler)
            assert grad is None or not grad.any(), key
            continue
        truth, pytorch = truth_grads[key], hf_grads[key]
        if transposed(key):
            truth, pytorch = truth.t(), pytorch.t()
        check_rule(grad, truth, pytorch, factor=3, what=f"grad {key}")


def check_greedy_generation(ours, hf, ids, mask, new_tokens: int = 32):
    """pyllm's greedy ``generate`` gives transformers' tokens, and streams them."""
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    streamed = []
    got = ours.generate(ids, new_tokens, attention_mask=mask, callback=streamed.append)
    assert torch.equal(got, expected)
    assert torch.equal(torch.stack(streamed, 1), got[:, ids.shape[1]:])


def check_paged_generation(ours, hf, vocab: int, page_size: int, new_tokens: int = 24):
    """``generate`` through paged KV caches (prompts of 11, 7 and 2 real tokens
    packed without padding; pages of ``page_size``) gives transformers'
    greedy tokens from the left-padded batch, and streams them; the packed
    prefill's logits are each prompt's alone; the caches hold each sequence's
    own tokens."""
    ids = torch.randint(1, vocab, (3, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 4), (2, 9)):
        mask[row, :pad], ids[row, :pad] = 0, 0
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    streamed = []
    got = ours.generate(ids, new_tokens, attention_mask=mask, page_size=page_size,
                        callback=streamed.append)
    assert torch.equal(got, expected)
    assert torch.equal(torch.stack(streamed, 1), got[:, ids.shape[1]:])
    caches = ours.new_paged_caches(3, 16, page_size)
    keep = mask.bool()
    cu = torch.tensor([0, 11, 18, 20], dtype=torch.int32)
    with torch.no_grad():
        packed = ours(ids[keep][None], caches=caches, cu_seqlens=cu)[0]
        for s in range(3):
            alone = ours(ids[s][keep[s]][None])[0]
            torch.testing.assert_close(packed[cu[s]:cu[s + 1]], alone, rtol=1e-4, atol=1e-4)
        assert caches[0].lengths == [11, 7, 2]
        with pytest.raises(ValueError, match="pass no attention_mask"):
            ours(ids, mask, caches=caches)
