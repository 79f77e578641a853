"""pyllm.models.GPT2LMHeadModel (built from pyllm.nn only) against Hugging
Face's GPT2LMHeadModel from a small random config: logits and the gradient of
every parameter within the harness rule (truth: the HF model in float64), in
float32 and bfloat16; greedy generation on a left-padded batch giving the same
32 tokens as transformers' generate; loading a saved checkpoint directory
(safetensors and pytorch_model.bin, GPT2Model's unprefixed names too)."""

import pytest
import torch

from model_parity import (check_against_hf, check_greedy_generation, check_paged_generation,
                          left_padded_prompts)
from pyllm.models import GPT2LMHeadModel

transformers = pytest.importorskip("transformers")

VOCAB = 101
CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def hf_gpt2(dtype=torch.float32, tie=True):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, tie_word_embeddings=tie,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval().to(dtype)
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("dtype,tie", [(torch.float32, True), (torch.float32, False),
                                       (torch.bfloat16, True)])
def test_logits_and_gradients_match_hugging_face(dtype, tie):
    hf = hf_gpt2(dtype, tie)
    ours = GPT2LMHeadModel.from_hf(hf)
    assert next(ours.parameters()).dtype == dtype
    ids, mask = left_padded_prompts(VOCAB)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    target = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(4))
    check_against_hf(ours, hf, lambda m: m(ids, mask),
                     lambda m: m(ids, attention_mask=mask, position_ids=positions).logits,
                     mask.bool(), target, transposed=lambda k: k.endswith(CONV1D))


def test_greedy_generation_matches_transformers_generate():
    hf = hf_gpt2()
    ours = GPT2LMHeadModel.from_hf(hf)
    ids, mask = left_padded_prompts(VOCAB)
    check_greedy_generation(ours, hf, ids, mask)


@pytest.mark.parametrize("safe", [True, False])
def test_from_checkpoint_directory(tmp_path, safe):
    hf = hf_gpt2()
    hf.transformer.save_pretrained(tmp_path, safe_serialization=safe)  # GPT2Model: "h.0..."
    ours = GPT2LMHeadModel.from_hf(tmp_path)
    from_object = GPT2LMHeadModel.from_hf(hf)
    ids, _ = left_padded_prompts(VOCAB)
    assert torch.equal(ours(ids), from_object(ids))
    assert ours.lm_head.weight is ours.transformer.wte.weight  # tied


def test_from_hf_errors():
    with pytest.raises(TypeError, match="checkpoint directory"):
        GPT2LMHeadModel.from_hf(42)
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2LMHeadModel.from_hf("/nonexistent-folder")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                     reorder_and_upcast_attn=True)
    with pytest.raises(NotImplementedError, match="reorder_and_upcast_attn"):
        GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(config))


def test_too_many_tokens_is_refused():
    ours = GPT2LMHeadModel.from_hf(hf_gpt2())
    with pytest.raises(ValueError, match="exceed n_positions"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed n_positions"):
        ours.generate(torch.zeros(1, 100, dtype=torch.long), 29)


@pytest.mark.parametrize("page_size", [16, 5])
def test_paged_generation_matches_transformers_generate(page_size):
    """Learned positions follow each sequence's own cached tokens."""
    check_paged_generation(GPT2LMHeadModel.from_hf(hf_gpt2()), hf_gpt2(), VOCAB, page_size)
