"""The LLaMA decoder stack in one C++ call (pyllm/models/direct_decode.py,
csrc/decoder_direct.cpp): a packed model's prefill and decode steps through it
give the modules' logits and KV caches bit for bit (dtypes, batch sizes,
grouped-query heads, biases, rope scaling, weight changes between steps), and
every call the modules would run differently (hooks, gradients, unpacked
weights, masks, windows, a replaced forward, the profiler) runs the modules.
pyllm._C.decoder_layers_direct refuses bad arguments with nothing changed."""

import pytest
import torch
from torch import nn

import pyllm.models.llama as llama_module
from harness import ISAS, run_under_isa
from pyllm import _C
from pyllm.models import direct_decode
from pyllm.models.llama import LlamaConfig, LlamaForCausalLM
from pyllm.nn import SwiGLU

VOCAB = 97


def _model(dtype, kv_heads=2, tie=False, rope=None, layers=3, pack=True):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=150,
                         num_hidden_layers=layers, num_attention_heads=6,
                         num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         rope_parameters=rope, max_position_embeddings=32 if rope else None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, dtype=dtype).eval()
    with torch.no_grad():  # norms away from ones, so a wrong weight shows
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    if pack:
        model.pack_for_inference()
    return model


def _served(dtype, rows) -> bool:
    """Whether the packed modules read the packed copies for this many rows
    (pyllm.nn.packing.packed_serves_rows): beyond the skinny kernels' 16 rows,
    or on AVX-512 where the panels hold the weight's own dtype (not float16
    or bfloat16 widened to float32)."""
    isa = _C.cpu_isa()
    widened = dtype == torch.float16 or (dtype == torch.bfloat16 and isa != "avx512_bf16")
    return rows > 16 or (isa in ("avx512", "avx512_bf16") and not widened)


def _counting(results: list):
    """llama_layers, recording in ``results`` whether each call ran the stack."""
    real = llama_module.llama_layers

    def counting(*args):
        out = real(*args)
        results.append(out is not None)
        return out
    return counting


@pytest.fixture
def taken(monkeypatch):
    """One entry per model call (but those of _steps(modules_only=True)):
    True where the stack ran in one call, False where the modules ran."""
    results = []
    monkeypatch.setattr(llama_module, "llama_layers", _counting(results))
    return results


def _steps(model, *, batch=1, prompt=7, steps=4, between=None, grad=False, mask=False,
           modules_only=False):
    """Logits of a prompt then `steps` one-token steps, and the caches.
    between(model, step) runs before each decode step; modules_only runs
    the layers as modules throughout."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, prompt + steps), generator=gen)
    caches = model.new_caches(batch, prompt + steps + 2)
    real = llama_module.llama_layers
    if modules_only:
        llama_module.llama_layers = lambda *args: None
    try:
        with torch.set_grad_enabled(grad):
            attention_mask = torch.ones(batch, prompt, dtype=torch.long) if mask else None
            outs = [model(ids[:, :prompt], attention_mask, caches)]
            for step in range(steps):
                if between is not None:
                    between(model, step)
                if mask:
                    attention_mask = torch.ones(batch, prompt + step + 1, dtype=torch.long)
                outs.append(model(ids[:, prompt + step:prompt + step + 1], attention_mask, caches,
                                  last_only=True))
    finally:
        llama_module.llama_layers = real
    return [o.detach() for o in outs], caches


def _assert_same(a, b):
    outs_a, caches_a = a
    outs_b, caches_b = b
    for x, y in zip(outs_a, outs_b):
        assert torch.equal(x, y)
    for ca, cb in zip(caches_a, caches_b):
        assert ca.length == cb.length
        assert torch.equal(ca.keys[:, :ca.length], cb.keys[:, :cb.length])
        assert torch.equal(ca.values[:, :ca.length], cb.values[:, :cb.length])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_stack_equals_the_modules(taken, dtype, batch, kv_heads):
    model = _model(dtype, kv_heads)
    expected = _steps(model, batch=batch, modules_only=True)
    assert taken == []
    _assert_same(_steps(model, batch=batch), expected)
    # the prompt and every step, where the packed modules read the packed copy
    assert taken == [_served(dtype, 7 * batch)] + [_served(dtype, batch)] * 4


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE, {"rope_type": "dynamic", "factor": 2.0}],
                         ids=["plain", "llama3", "dynamic"])
def test_rope_scaling_and_tied_embeddings(taken, rope):
    """(max_position_embeddings 32: dynamic scaling rescales past it, its
    tables computed anew for each length.)"""
    model = _model(torch.bfloat16, tie=True, rope=rope)
    prompt = 40 if rope and rope["rope_type"] == "dynamic" else 20
    _assert_same(_steps(model, prompt=prompt), _steps(model, prompt=prompt, modules_only=True))
    assert taken == [True] + [_served(torch.bfloat16, 1)] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_biases(taken, dtype):
    """q and k biases without v's (zeros stacked in), a float32 o_proj bias
    (kept float32), float32 gate/up/down biases (cast as the modules cast)."""
    model = _model(dtype, pack=False)
    gen = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj, bias_dtype in ((attn.q_proj, dtype), (attn.k_proj, torch.float32),
                                 (attn.o_proj, torch.float32), (mlp.gate_proj, torch.float32),
                                 (mlp.up_proj, torch.float32), (mlp.down_proj, dtype)):
            proj.bias = nn.Parameter(torch.randn(proj.out_features, generator=gen).to(bias_dtype))
    model.pack_for_inference()
    _assert_same(_steps(model), _steps(model, modules_only=True))
    assert taken == [_served(dtype, 7)] + [_served(dtype, 1)] * 4


def test_more_rows_than_the_skinny_kernels(taken):
    model = _model(torch.bfloat16)
    _assert_same(_steps(model, batch=2, prompt=23), _steps(model, batch=2, prompt=23,
                                                          modules_only=True))
    assert taken == [True] + [_served(torch.bfloat16, 2)] * 4


def _scale_weight(model, step):
    if step == 1:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
            model.model.layers[2].input_layernorm.weight.mul_(0.5)


def _new_weight(model, step):
    if step == 2:
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight = nn.Parameter(attn.k_proj.weight.detach() * 2)


def _new_bias(model, step):
    if step == 1:
        proj = model.model.layers[1].mlp.up_proj
        proj.bias = nn.Parameter(torch.ones(proj.out_features, dtype=proj.weight.dtype))


def _new_eps(model, step):
    if step == 1:
        model.model.layers[0].input_layernorm.eps = 0.25


def _new_mlp(model, step):
    if step == 2:
        layer = model.model.layers[1]
        torch.manual_seed(7)
        layer.mlp = SwiGLU(96, 150, dtype=layer.mlp.down_proj.weight.dtype).pack()


@pytest.mark.parametrize("change", [_scale_weight, _new_weight, _new_bias, _new_eps, _new_mlp],
                         ids=["in_place", "new_parameter", "new_bias", "new_eps", "new_mlp"])
def test_follows_changes_between_steps(taken, change):
    """A weight changed between steps: the next step packs again, as the
    modules do, and gives their result."""
    expected = _steps(_model(torch.bfloat16), between=change, modules_only=True)
    _assert_same(_steps(_model(torch.bfloat16), between=change), expected)
    assert taken == [_served(torch.bfloat16, 7)] + [_served(torch.bfloat16, 1)] * 4


def _hook_counter(model, calls):
    return lambda module, args, out: calls.append(type(module).__name__)


def _mlp_hook(model, step, calls):
    if step == 1:
        model.model.layers[2].mlp.register_forward_hook(_hook_counter(model, calls))


def _norm_pre_hook(model, step, calls):
    if step == 1:
        model.model.layers[0].post_attention_layernorm.register_forward_pre_hook(
            lambda module, args: calls.append("pre"))


def _down_proj_hook(model, step, calls):
    if step == 1:
        model.model.layers[1].mlp.down_proj.register_forward_hook(_hook_counter(model, calls))


def _replaced_forward(model, step, calls):
    if step == 1:
        layer = model.model.layers[1]
        plain = layer.mlp.forward
        layer.mlp.forward = lambda x: (calls.append("forward"), plain(x))[1]


def _window(model, step, calls):
    if step == 1:
        model.model.layers[1].self_attn.window_size = (3, 0)


def _activation(model, step, calls):
    if step == 1:
        model.model.layers[2].self_attn.o_proj.activation = "silu"


@pytest.mark.parametrize("change", [_mlp_hook, _norm_pre_hook, _down_proj_hook, _replaced_forward,
                                    _window, _activation],
                         ids=["forward_hook", "pre_hook", "projection_hook", "replaced_forward",
                              "window", "activation"])
def test_what_the_stack_cannot_honour_runs_the_modules(taken, change):
    """A change made between steps (after the stack has run): later steps run
    the modules, whose hooks fire, and give the modules' results."""
    calls_fast, calls_modules = [], []
    got = _steps(_model(torch.bfloat16), between=lambda m, s: change(m, s, calls_fast))
    expected = _steps(_model(torch.bfloat16), between=lambda m, s: change(m, s, calls_modules),
                      modules_only=True)
    _assert_same(got, expected)
    assert calls_fast == calls_modules
    # the prompt and the first step ran before the change
    assert taken[:2] == [_served(torch.bfloat16, 7), _served(torch.bfloat16, 1)]
    assert True not in taken[2:]


def test_global_hook_runs_the_modules(taken):
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(1))
    try:
        got = _steps(_model(torch.bfloat16), steps=2)
        count = len(calls)
        expected = _steps(_model(torch.bfloat16), steps=2, modules_only=True)
    finally:
        handle.remove()
    _assert_same(got, expected)
    assert count == len(calls) - count > 0
    assert True not in taken


@pytest.mark.parametrize("how", ["grad", "unpacked", "mask", "profiler"])
def test_other_calls_run_the_modules(taken, how):
    model = _model(torch.bfloat16, pack=how != "unpacked")
    if how == "grad":  # grad mode on, nothing requiring grad: the packed modules still
        model.requires_grad_(False)
    kwargs = {"grad": how == "grad", "mask": how == "mask"}
    if how == "profiler":
        with torch.profiler.profile() as prof:
            got = _steps(model, steps=1)
        names = [e.name for e in prof.events()]
        assert names.count("pyllm::linear_packed") >= 3 * 2  # each layer's o_proj and down_proj
        kwargs["steps"] = 1
    else:
        got = _steps(model, **kwargs)
    _assert_same(got, _steps(model, modules_only=True, **kwargs))
    assert True not in taken


def test_full_cache_raises_as_the_modules(taken):
    model = _model(torch.float32)
    caches = model.new_caches(1, 4)
    ids = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad(), pytest.raises(ValueError, match="exceed the 4 allocated"):
        model(ids, None, caches)
    assert [c.length for c in caches] == [0, 0, 0]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_generate_gives_the_modules_tokens(taken, monkeypatch, mode):
    model = _model(torch.bfloat16)
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        got = model.generate(prompt, 12)
    assert taken[0] and taken[1:] == [_served(torch.bfloat16, 2)] * 11
    monkeypatch.setattr(llama_module, "llama_layers", lambda *args: None)
    with context():
        assert torch.equal(got, model.generate(prompt, 12))


def _direct_args(model, x, caches):
    """The arguments llama_layers passes for x over these caches."""
    context = (x.dtype, False, False)
    shape, layers = [], []
    for layer, cache in zip(model.model.layers, caches):
        layers.append(direct_decode._cached_layer_args(layer, cache, x, context, shape))
    return layers, shape


def test_refused_arguments_change_nothing():
    model = _model(torch.bfloat16)
    caches = model.new_caches(1, 8)
    for c in caches:
        c.keys.fill_(float("nan"))
        c.values.fill_(float("nan"))
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor([[3]]))
        layers, shape = _direct_args(model, x, caches)
        assert None not in layers

        def call(layers=layers, x=x, residual=None, length=0, shape=shape):
            return _C.decoder_layers_direct(x, residual, layers, length, *shape)

        def with_field(i, value, layer=1):
            changed = list(layers)
            changed[layer] = layers[layer][:i] + (value,) + layers[layer][i + 1:]
            return changed

        fields = layers[0]
        refused = [
            call(x=x.float()),                                 # x of another dtype than the panels
            call(x=x[0]),                                      # 2-D x
            call(residual=x[:, :, :5]),                        # residual of another shape
            call(length=8),                                    # no room for the token
            call(length=-1),
            call(shape=[shape[0], 4, shape[2]]),               # heads_kv not dividing heads
            call(shape=[shape[0] + 1, shape[1], shape[2]]),    # panels of another width
            call(layers=[]),
            call(layers=layers + [fields[:-1]]),               # a short tuple
            call(layers=with_field(0, fields[0][:-1])),        # norm weight of another size
            call(layers=with_field(1, 1)),                     # eps an int
            call(layers=with_field(2, fields[2][:-1])),        # qkv panels of another shape
            call(layers=with_field(3, torch.ones(7))),         # qkv bias of another size
            call(layers=with_field(10, torch.ones(150))),      # gate bias float32 (modules cast)
            call(layers=with_field(12, 0)),                    # no intermediate features
            call(layers=with_field(15, fields[15][:0])),       # cos without rows
            call(layers=with_field(16, fields[16].double())),  # sin float64
            call(layers=with_field(17, 1)),                    # interleaved not a bool
            call(layers=with_field(18, fields[18].float())),   # keys of another dtype
            call(layers=with_field(19, fields[19][:, :, :1])),  # values of another shape
            call(layers=with_field(2, "panels")),
        ]
        assert refused == [None] * len(refused)
    refused_with_grad = call()  # grad mode on
    assert refused_with_grad is None
    for c in caches:
        assert c.keys.isnan().all() and c.values.isnan().all() and c.length == 0
    with torch.no_grad():
        x_out, residual = call()
        assert x_out.shape == residual.shape == x.shape
        assert not caches[2].keys[:, :1].isnan().any()


@pytest.mark.parametrize("isa", ISAS)
def test_every_cpu_isa(isa):
    """On each instruction set the stack gives the modules' results; it runs
    where the packed modules read the packed copies (every row count on
    AVX-512, more than 16 rows elsewhere)."""
    run_under_isa(isa, """
        import torch
        import test_direct_decode as t
        from pyllm import _C
        import pyllm.models.llama as llama_module
        taken = []
        llama_module.llama_layers = t._counting(taken)
        for dtype in (torch.float32, torch.bfloat16):
            model = t._model(dtype)
            t._assert_same(t._steps(model, prompt=20, steps=2),
                           t._steps(model, prompt=20, steps=2, modules_only=True))
        skinny = _C.cpu_isa() in ("avx512", "avx512_bf16")
        bf16_skinny = _C.cpu_isa() == "avx512_bf16"
        # fp32: prompt of 20 rows, 2 steps; bf16 likewise
        expected = [True, skinny, skinny, True, bf16_skinny, bf16_skinny]
        assert taken == expected, (taken, expected)
    """)


def test_torch_compile_traces_the_modules(taken):
    """Under torch.compile (fullgraph) the stack is not called: the traced
    graph holds the modules' ops, with their results."""
    model = _model(torch.float32, layers=2)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids, None, model.new_caches(1, 8))
        taken.clear()
        caches = model.new_caches(1, 8)
        got = torch.compile(lambda i, c: model(i, None, c), fullgraph=True)(ids, caches)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert caches[0].length == 6
    assert True not in taken


def test_batch_invariant_mode(taken):
    """In batch-invariant mode (attention through the prefill kernel, packed
    products at every row count) the stack still gives the modules' bits,
    and a sequence's logits do not depend on the batch around it."""
    import pyllm

    model = _model(torch.bfloat16)
    with pyllm.batch_invariant():
        got = _steps(model, batch=3)
        _assert_same(got, _steps(model, batch=3, modules_only=True))
        alone = _steps(model, batch=1)
    assert taken == [True] * 10
    first = [o[:1] for o in got[0]]
    for x, y in zip(first, alone[0]):
        assert torch.equal(x, y)
