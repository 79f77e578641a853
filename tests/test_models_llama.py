"""pyllm.models.LlamaForCausalLM (built from pyllm.nn only) against Hugging
Face's LlamaForCausalLM with GQA from a small random config: logits and the
gradient of every parameter within the harness rule (truth: the HF model in
float64), greedy generation with a left-padded batch giving the same 32
tokens as transformers' generate, sampling options, stop tokens, streaming,
and errors for a checkpoint with a missing tensor."""

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import check_rule
from pyllm.models import LlamaForCausalLM

transformers = pytest.importorskip("transformers")


def hf_llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def prompts():
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_gradients_match_hugging_face(tie):
    hf = hf_llama(tie)
    ours = LlamaForCausalLM.from_hf(hf)
    hf64 = copy.deepcopy(hf).double()
    ids, mask = prompts()
    target = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(4))
    runs = {}
    for name, model in (("ours", ours), ("hf", hf), ("hf64", hf64)):
        model.zero_grad()
        logits = model(ids, mask) if name == "ours" else model(ids, attention_mask=mask).logits
        keep = mask.bool()
        F.cross_entropy(logits[keep].float(), target[keep]).backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        runs[name] = (logits[keep], grads)
    check_rule(runs["ours"][0], runs["hf64"][0], runs["hf"][0], what="logits")
    assert runs["ours"][1].keys() == runs["hf"][1].keys()
    for key, grad in runs["ours"][1].items():
        check_rule(grad, runs["hf64"][1][key], runs["hf"][1][key], factor=3, what=f"grad {key}")


def test_greedy_generation_matches_transformers_generate():
    hf = hf_llama()
    ours = LlamaForCausalLM.from_hf(hf)
    ids, mask = prompts()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                           pad_token_id=0)
    streamed = []
    got = ours.generate(ids, 32, attention_mask=mask, callback=streamed.append)
    assert torch.equal(got, expected)
    assert torch.equal(torch.stack(streamed, 1), got[:, 9:])


def test_sampling_options_and_stop_token():
    ours = LlamaForCausalLM.from_hf(hf_llama())
    ids, mask = prompts()
    greedy = ours.generate(ids, 8, attention_mask=mask)
    top1 = ours.generate(ids, 8, attention_mask=mask, temperature=0.7, top_k=1,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, greedy)  # top_k=1 leaves only the argmax
    tiny_p = ours.generate(ids, 8, attention_mask=mask, temperature=1.0, top_p=1e-6,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_p, greedy)  # the smallest set reaching top_p: the argmax
    sampled = ours.generate(ids, 8, attention_mask=mask, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert sampled.shape == greedy.shape and (sampled[:, :9] == ids).all()
    stop = int(greedy[0, 9])  # the first sequence's first new token
    pad = next(t for t in range(97) if t not in greedy[0, 10:].tolist())
    stopped = ours.generate(ids, 8, attention_mask=mask, eos_token_id=stop, pad_token_id=pad)
    assert stopped[0, 9] == stop and (stopped[0, 10:] == pad).all()


def test_from_hf_names_a_missing_tensor():
    hf = hf_llama()

    class Partial:
        config = hf.config

        def state_dict(self):
            state = hf.state_dict()
            del state["model.layers.1.mlp.up_proj.weight"]
            return state

    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        LlamaForCausalLM.from_hf(Partial())
