"""pyllm.nn drop-in modules against their torch.nn counterparts (same
state_dict keys, parameters, outputs within the harness rule, gradients), the
fused-residual forms, and pyllm.patch / unpatch on a plain PyTorch model and on
a Hugging Face Llama (GQA) built from a small random config."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyllm
from harness import KERNEL_DTYPES, as64, check_rule, generator, randn
from pyllm import reference




@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 127), (2, 3, 4, 10)], ids=str)
def test_layer_norm_is_torch_layer_norm(shape, dtype):
    normalized = shape[-1:] if len(shape) == 2 else shape[-2:]
    ours, theirs = pyllm.nn.LayerNorm(normalized, eps=1e-6), nn.LayerNorm(normalized, eps=1e-6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    gen = generator("nn layer_norm", shape)
    state = {k: randn(v.shape, gen=gen) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = randn(shape, dtype, gen=gen, scale=2.0)
    flat = x.reshape(*shape[:-len(normalized)], -1).double()
    truth = reference.layer_norm(flat, ours.weight.double().reshape(-1),
                                 ours.bias.double().reshape(-1), 1e-6)[0].reshape(shape)
    check_rule(ours(x), truth, theirs(x))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_rms_norm_is_torch_rms_norm(dtype):
    ours, theirs = pyllm.nn.RMSNorm(127), nn.RMSNorm(127)
    assert ours.state_dict().keys() == theirs.state_dict().keys() and ours.eps is None
    gen = generator("nn rms_norm", dtype)
    w = randn((127,), gen=gen, offset=1.0)
    ours.load_state_dict({"weight": w})
    theirs.load_state_dict({"weight": w})
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = randn((7, 127), dtype, gen=gen)
    eps = torch.finfo(dtype).eps
    check_rule(ours(x), reference.rms_norm(x.double(), w.double(), eps)[0], theirs(x))


@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
def test_norm_residual_form_and_gradients(module):
    gen = generator("nn residual", module)
    norm = getattr(pyllm.nn, module)(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn((64,), gen=gen, offset=1.0))
    x, r = randn((5, 64), gen=gen), randn((5, 64), gen=gen)
    y, s = norm(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, norm(x + r))
    (y.square().sum() + s.sum()).backward()
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()


@pytest.mark.parametrize("module", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
def test_norm_residual_keeps_the_wider_dtype(module, low):
    """A low-precision sublayer output (autocast) added to a float32 residual
    stream: the sum and the norm are float32, as torch's ``x + residual``
    promotes, and the sum is exact (not the residual rounded to bf16)."""
    gen = generator("nn residual wide", module, low)
    norm = getattr(pyllm.nn, module)(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn((96,), gen=gen, offset=1.0))
    x, r = randn((5, 96), low, gen=gen), randn((5, 96), gen=gen)
    y, s = norm(x, r)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, x.float() + r, atol=0, rtol=0)
    torch.testing.assert_close(y, norm(x.float() + r))
    # the same order the other way round: a float32 x and a low residual
    y2, s2 = norm(r, x)
    assert s2.dtype == y2.dtype == torch.float32
    torch.testing.assert_close(s2, s, atol=0, rtol=1e-7)


def test_norm_rejects_wrong_trailing_shape():
    with pytest.raises(ValueError, match=r"trailing dimensions \[64\]"):
        pyllm.nn.LayerNorm(64)(torch.randn(3, 63))


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_linear_is_torch_linear(dtype, act):
    torch.manual_seed(0)
    theirs = nn.Linear(100, 37)
    ours = pyllm.nn.Linear(100, 37, activation=act)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.weight.shape == theirs.weight.shape and ours.bias.shape == theirs.bias.shape
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = randn((9, 100), dtype, gen=generator("nn linear", dtype, act))
    truth = reference.linear(*as64(x, ours.weight, ours.bias), act)
    check_rule(ours(x), truth, reference.ACTIVATIONS[act](theirs(x)))


def test_linear_without_bias_and_default_init_like_torch():
    ours = pyllm.nn.Linear(64, 32, bias=False)
    assert ours.bias is None and "bias" not in ours.state_dict()
    bound = 1 / 64 ** 0.5
    assert ours.weight.abs().max() <= bound and ours.weight.std() > bound / 3


@pytest.mark.parametrize("name", ["Linear", "LayerNorm", "RMSNorm", "MultiheadAttention"])
def test_drop_ins_are_the_torch_classes(name):
    """Each drop-in subclasses the torch class it replaces (isinstance checks in
    PEFT, tensor-parallel plans, FSDP wrap policies find it), with its
    parameters drawn by the same initialisation (same seed, same values), its
    state_dict, extra_repr and attributes; a pyllm forward."""
    args = {"Linear": (48, 40), "LayerNorm": ((5, 8),), "RMSNorm": (40,),
            "MultiheadAttention": (32, 4)}[name]
    torch.manual_seed(3)
    theirs = getattr(nn, name)(*args)
    torch.manual_seed(3)
    ours = getattr(pyllm.nn, name)(*args)
    assert isinstance(ours, getattr(nn, name)) and type(ours).forward is not \
        getattr(nn, name).forward
    assert ours.extra_repr() == theirs.extra_repr()
    mine, torch_state = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == torch_state.keys()
    for key in mine:
        assert torch.equal(mine[key], torch_state[key]), key
    for attr in ("in_features", "out_features", "normalized_shape", "eps", "elementwise_affine",
                 "embed_dim", "num_heads", "head_dim", "batch_first", "_qkv_same_embed_dim"):
        assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
    if name == "Linear":
        assert "activation='silu'" in pyllm.nn.Linear(4, 4, activation="silu").extra_repr()
    if name == "MultiheadAttention":
        assert isinstance(ours.out_proj, pyllm.nn.Linear)
    # patch leaves pyllm's own modules alone, and reports nothing about them
    report = pyllm.patch(nn.Sequential(ours))
    assert not report.replaced and not report.skipped


def test_swiglu_mlp_matches_llama_mlp_formula():
    gen = generator("nn swiglu")
    mlp = pyllm.nn.SwiGLU(48, 130)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    x = randn((6, 48), gen=gen)
    expected = mlp.down_proj.weight.double() @ (
        F.silu(x.double() @ mlp.gate_proj.weight.double().T) *
        (x.double() @ mlp.up_proj.weight.double().T)).T
    theirs = F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                      mlp.down_proj.weight)
    check_rule(mlp(x), expected.T, theirs)


def test_patch_plain_model_and_unpatch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 8),
                          nn.RMSNorm(8, eps=1e-6))
    x = torch.randn(10, 32)
    before = model(x)
    truth = copy.deepcopy(model).double()(x.double())
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    report = pyllm.patch(model)
    assert [old for _, old, _ in report.replaced] == ["Linear", "LayerNorm", "Linear", "RMSNorm"]
    assert isinstance(model[0], pyllm.nn.Linear) and isinstance(model[4], pyllm.nn.RMSNorm)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    after = model(x)
    check_rule(after, truth, before)
    assert "4 modules" in str(report)
    assert pyllm.unpatch(model) == 4
    assert type(model[0]) is nn.Linear and torch.equal(model(x), before)


def test_patch_leaves_hooked_modules_and_respects_switches():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    model[0].register_forward_hook(lambda *a: None)
    report = pyllm.patch(model, norms=False)
    assert report.replaced == [] and report.skipped == [("0", "has forward hooks")]


def tiny_llama():
    """A 2-layer Hugging Face Llama with GQA 8:2 from a random config, and its config."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=150,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), config


def test_patched_hugging_face_llama_gives_the_same_logits():
    transformers = pytest.importorskip("transformers")
    model, config = tiny_llama()
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        report = pyllm.patch(model)
        after = model(ids).logits
    kinds = {old for _, old, _ in report.replaced}
    assert kinds == {"Linear", "LlamaRMSNorm", "attn_implementation=sdpa",
                     "apply_rotary_pos_emb", "ForCausalLMLoss"}, report
    assert model.config._attn_implementation == "pyllm"
    # 2 layers x (4 attention + 3 MLP projections + 2 norms) + final norm + lm_head + attention
    # + rotary + loss
    assert len(report.replaced) == 2 * 9 + 5
    with torch.no_grad():
        model64 = transformers.LlamaForCausalLM(config).double().eval()
        assert pyllm.unpatch(model) == 2 * 9 + 5
        assert model.config._attn_implementation == "sdpa"
        model64.load_state_dict(model.state_dict())
        truth = model64(ids).logits
    check_rule(after, truth, before)


def test_patched_llama_generates_the_same_tokens_with_left_padding():
    model, _ = tiny_llama()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # the second prompt is left-padded
    ids[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    pyllm.patch(model)
    assert torch.equal(model.generate(ids, **kwargs), expected)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms trivially
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, config


def test_patched_hugging_face_gpt2_conv1d_gives_the_same_logits_and_tokens():
    transformers = pytest.importorskip("transformers")
    model, config = tiny_gpt2()
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model(ids).logits
        expected = model.generate(ids, **kwargs)
        report = pyllm.patch(model)
        after = model(ids).logits
    kinds = {(old, new) for _, old, new in report.replaced}
    assert ("Conv1D", "pyllm.nn.Conv1D") in kinds and ("LayerNorm", "pyllm.nn.LayerNorm") in kinds
    # 2 layers x (2 attention + 2 MLP Conv1D + 2 norms) + ln_f + lm_head + attention
    assert len(report.replaced) == 2 * 6 + 3, report
    assert isinstance(model.transformer.h[0].attn.c_attn, pyllm.nn.Conv1D)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    with torch.no_grad():
        model64 = transformers.GPT2LMHeadModel(config).double().eval()
        state = model.state_dict()
        assert pyllm.unpatch(model) == 2 * 6 + 3
        model64.load_state_dict(state)
        truth = model64(ids).logits
    check_rule(after, truth, before)


def test_patched_hugging_face_bert_gives_the_same_hidden_states():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        report = pyllm.patch(model)
        after = model(ids, attention_mask=mask).last_hidden_state
        # 2 layers x (4 attention + 2 MLP Linear + 2 LayerNorm) + embeddings norm + pooler
        assert len(report.replaced) == 2 * 8 + 3, report
        model64 = transformers.BertModel(config).double().eval()
        model64.load_state_dict(model.state_dict())
        truth = model64(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    check_rule(after[keep], truth[keep], before[keep])


def test_conv1d_forward_backward_matches_hugging_face_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D as HFConv1D
    torch.manual_seed(0)
    hf = HFConv1D(21, 10)
    ours = pyllm.nn.Conv1D(21, 10)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 7, 10, requires_grad=True)
    out = ours(x)
    torch.testing.assert_close(out, hf(x))
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, ours.weight, ours.bias), grad)
    expected = torch.autograd.grad(hf(x), (x, hf.weight, hf.bias), grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_attention_matches_hugging_face_llama_attention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama
    _, config = tiny_llama()
    config._attn_implementation = "sdpa"
    hf = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    rope = modeling_llama.LlamaRotaryEmbedding(config)
    ours = pyllm.nn.Attention(64, 8, 2, rope_base=config.rope_parameters["rope_theta"])
    ours.load_state_dict(hf.state_dict())
    x = randn((2, 11, 64), gen=generator("nn attention hf"))
    positions = torch.arange(11)[None].expand(2, -1)
    with torch.no_grad():
        theirs = hf(x, position_embeddings=rope(x, positions), attention_mask=None)[0]
        hf64 = copy.deepcopy(hf).double()
        truth = hf64(x.double(), position_embeddings=tuple(t.double() for t in rope(x, positions)),
                     attention_mask=None)[0]
        check_rule(ours(x), truth, theirs)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_rotary_embedding_rotate_equals_the_face(dtype, monkeypatch):
    """rotate()'s plain CPU calls (the operator without the face) give the
    face's bits, for every way of giving positions; the others take the face."""
    rope = pyllm.nn.RotaryEmbedding(16, 500.0, rotary_dim=12)
    face, faces = pyllm.rotary, []
    monkeypatch.setattr(pyllm, "rotary", lambda *a, **k: faces.append(1) or face(*a, **k))
    q = randn((1, 3, 4, 16), dtype, gen=generator("rotate direct", dtype))
    with torch.no_grad():
        rope.rotate(q, q[:, :, :2], torch.arange(3), 3)
    assert faces == []  # a decode step's call: the operator itself
    gen = generator("rotate", dtype)
    for batch, positions in [(1, torch.arange(3, 8)), (2, torch.arange(5)),
                             (2, torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])),
                             (1, torch.arange(5, dtype=torch.int32)), (1, torch.arange(10)[::2])]:
        q, k = randn((batch, 5, 4, 16), dtype, gen=gen), randn((batch, 5, 2, 16), dtype, gen=gen)
        cos, sin = rope.tables(12, q.device)
        want = face(q.clone(), k.clone(), cos, sin, positions)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = rope.rotate(q.clone(), k.clone(), positions, 12)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (batch, positions)
    q = randn((1, 5, 4, 16), torch.float32, gen=gen).requires_grad_()
    rotated, _ = rope.rotate(q * 1, q.new_zeros(1, 5, 0, 16), torch.arange(5), inplace=True)
    assert rotated.grad_fn is not None  # autograd: the face's differentiable path
    with pytest.raises(ValueError, match="positions must lie in"):
        with torch.no_grad():
            rope.rotate(q.detach().clone(), q.detach().clone(), torch.tensor([300]).expand(5), 256)


def test_float64_attention_with_a_cache_takes_the_reference_backend():
    """float64 (no CPU kernel: the reference backend) through a cached decode:
    rotate() leaves it to the face, which routes it (the operator itself
    would refuse float64)."""
    attn = pyllm.nn.Attention(32, 4, 2, rope_base=10000.0, dtype=torch.float64).eval()
    x = randn((1, 6, 32), torch.float64, gen=generator("nn attention float64"))
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(1, 8)
        steps = [attn(x[:, :5], cache=cache), attn(x[:, 5:], cache=cache)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)


def test_attention_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    attn = pyllm.nn.Attention(64, 8, 2, rope_base=10000.0).eval()
    x = randn((2, 11, 64), gen=generator("nn attention cache"))
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(2, 16)
        steps = [attn(x[:, :7], cache=cache)] + [attn(x[:, t:t + 1], cache=cache)
                                                  for t in range(7, 11)]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed the 16 allocated"):
        attn(x[:, :6], cache=cache)


def test_attention_variants_decode_equals_full_forward_and_train():
    """pyllm.nn.Attention with a sliding window, a softcap, ALiBi and learned
    sinks: decoding through the KV cache gives the full forward's outputs,
    the output matches the reference, and the sinks get a gradient."""
    torch.manual_seed(0)
    slopes = torch.exp2(-torch.arange(1, 9, dtype=torch.float32))
    attn = pyllm.nn.Attention(64, 8, 2, rope_base=10000.0, window_size=(4, 0), softcap=5.0,
                              alibi_slopes=slopes, sinks=True).eval()
    with torch.no_grad():
        attn.sinks.copy_(torch.linspace(-1, 1, 8))
    x = randn((2, 11, 64), gen=generator("nn attention variants"))
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(2, 16)
        steps = [attn(x[:, :7], cache=cache)] + [attn(x[:, t:t + 1], cache=cache)
                                                  for t in range(7, 11)]
        q = attn.q_proj(x).view(2, 11, 8, 8)
        k = attn.k_proj(x).view(2, 11, 2, 8)
        v = attn.v_proj(x).view(2, 11, 2, 8)
        q, k = attn.rotary.rotate(q, k, torch.arange(11), 11)
        want = reference.attention(q.double(), k.double(), v.double(), causal=True,
                                   window_size=(4, 0), softcap=5.0, alibi_slopes=slopes.double(),
                                   sinks=attn.sinks.double())[0]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, attn.o_proj(want.float().reshape(2, 11, 64)), rtol=1e-4,
                               atol=1e-5)
    attn.train()
    attn(x).square().sum().backward()
    assert attn.sinks.grad is not None and attn.sinks.grad.abs().max() > 0
    assert "alibi_slopes" in dict(attn.named_buffers())
    with pytest.raises(ValueError, match="positions of self-attention"):
        attn(x, x)  # cross-attention: the window and ALiBi have no meaning there


def test_cross_attention_and_key_padding_mask():
    torch.manual_seed(0)
    attn = pyllm.nn.Attention(32, 4, kv_size=24, causal=True).eval()
    gen = generator("nn cross attention")
    x, context = randn((2, 5, 32), gen=gen), randn((2, 9, 24), gen=gen)
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 6:] = False  # the second context's last 3 tokens are padding
    with torch.no_grad():
        out = attn(x, context, mask=keep)
        q = attn.q_proj(x).view(2, 5, 4, 8).double()
        k = attn.k_proj(context).view(2, 9, 4, 8).double()
        v = attn.v_proj(context).view(2, 9, 4, 8).double()
        additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        ref = reference.attention(q, k, v, bias=additive)[0].reshape(2, 5, 32)
        truth = F.linear(ref, attn.o_proj.weight.double())
        theirs = F.linear(F.scaled_dot_product_attention(
            q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
            attn_mask=keep).transpose(1, 2).reshape(2, 5, 32), attn.o_proj.weight)
    check_rule(out, truth, theirs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["self causal", "key padding + bool attn_mask", "kdim/vdim"])
def test_multihead_attention_is_torch_multihead_attention(kind, batch_first):
    kdim = vdim = None if kind != "kdim/vdim" else 24
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    ours = pyllm.nn.MultiheadAttention(32, 4, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    gen = generator("nn mha", kind, batch_first)
    n, length, source = 3, 6, 9
    q = randn((n, length, 32), gen=gen)
    kv = randn((n, source, kdim or 32), gen=gen)
    kwargs = {}
    if kind == "self causal":
        kv = q
        kwargs = {"is_causal": True, "attn_mask": None}
        torch_kwargs = {"is_causal": True, "attn_mask": nn.Transformer.generate_square_subsequent_mask(length)}
    elif kind == "key padding + bool attn_mask":
        padding = torch.zeros(n, source, dtype=torch.bool)
        padding[2, 7:] = True
        blocked = torch.rand(length, source, generator=gen) > 0.8
        blocked[:, 0] = False  # every query keeps a key
        kwargs = torch_kwargs = {"key_padding_mask": padding, "attn_mask": blocked}
    else:
        torch_kwargs = {}
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    key = value = kv
    with torch.no_grad():
        out, weights = ours(q, key, value, need_weights=False, **kwargs)
        expected, _ = theirs(q, key, value, need_weights=False, **torch_kwargs)
        truth, _ = copy.deepcopy(theirs).double()(
            q.double(), key.double(), value.double(), need_weights=False,
            **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in torch_kwargs.items()})
    assert weights is None and out.shape == expected.shape
    check_rule(out, truth, expected)


def test_multihead_attention_says_what_it_does_not_support():
    mha = pyllm.nn.MultiheadAttention(16, 2)
    x = torch.randn(4, 1, 16)
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        mha(x, x, x)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        pyllm.nn.MultiheadAttention(16, 2, add_bias_kv=True)
