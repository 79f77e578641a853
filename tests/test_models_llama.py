"""pyllm.models.LlamaForCausalLM (built from pyllm.nn only) against Hugging
Face's LlamaForCausalLM with GQA from a small random config: logits and the
gradient of every parameter within the harness rule (truth: the HF model in
float64), greedy generation with a left-padded batch giving the same 32
tokens as transformers' generate, sampling options, stop tokens, streaming,
and errors for a checkpoint with a missing tensor."""

import pytest
import torch

from model_parity import (check_against_hf, check_greedy_generation, check_paged_generation,
                          left_padded_prompts)
from pyllm.models import LlamaForCausalLM

transformers = pytest.importorskip("transformers")


def hf_llama(tie=False, rope=None, max_positions=128):
    extra = {"rope_parameters": {"rope_theta": 10000.0, **rope}} if rope else {}
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=max_positions,
                                      tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def prompts():
    return left_padded_prompts(97)


@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_gradients_match_hugging_face(tie):
    hf = hf_llama(tie)
    ours = LlamaForCausalLM.from_hf(hf)
    ids, mask = prompts()
    target = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(4))
    check_against_hf(ours, hf, lambda m: m(ids, mask),
                     lambda m: m(ids, attention_mask=mask).logits, mask.bool(), target)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 4},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4},
], ids=lambda r: r["rope_type"])
def test_scaled_rotary_matches_hugging_face(rope):
    """The rope scaling types run on pyllm.rotary's kernel and give HF's logits
    (dynamic NTK past max_position_embeddings: prompts longer than 8)."""
    hf = hf_llama(rope=rope, max_positions=8)
    ours = LlamaForCausalLM.from_hf(hf)
    ids, mask = prompts()
    assert ids.shape[1] > 8
    target = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(4))
    check_against_hf(ours, hf, lambda m: m(ids, mask),
                     lambda m: m(ids, attention_mask=mask).logits, mask.bool(), target)


def test_greedy_generation_matches_transformers_generate():
    hf = hf_llama()
    ours = LlamaForCausalLM.from_hf(hf)
    ids, mask = prompts()
    check_greedy_generation(ours, hf, ids, mask)


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


def test_from_hf_names_a_missing_or_mismatched_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        LlamaForCausalLM.from_hf(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 3\)"):
        LlamaForCausalLM.from_hf(tmp_path)


@pytest.mark.parametrize("page_size", [16, 5])
def test_paged_generation_matches_transformers_generate(page_size):
    check_paged_generation(LlamaForCausalLM.from_hf(hf_llama()), hf_llama(), 97, page_size)
