"""The model benchmark of ``pyllm bench --models`` as pytest-benchmark cases:
GPT-2-small-sized prefill (1 x 512 tokens) and generation (128 greedy tokens
after 512, batch 1 and 8), pyllm and transformers eager, fp32 and bf16. pyllm's
prefill logits are first checked against the float64 model under the rule."""

import pytest
import torch

from pyllm.accuracy import judge
from pyllm.benchmark.models import NEW_TOKENS, PROMPT, _gpt2_pair, _truth_logits

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def models(request):
    hf, ours = _gpt2_pair(getattr(torch, request.param), "cpu")
    ids = torch.randint(0, hf.config.vocab_size, (1, PROMPT),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        verdict = judge(ours(ids), _truth_logits(hf, ids), hf(ids).logits)
    assert verdict.ok, verdict.reason
    return request.param, hf, ours, ids


@pytest.mark.parametrize("implementation", ["pyllm", "eager"])
def test_prefill(benchmark, models, implementation):
    dtype, hf, ours, ids = models
    fn = (lambda: ours(ids)) if implementation == "pyllm" else (lambda: hf(ids).logits)
    benchmark.group = f"gpt2-small prefill B1 S{PROMPT} {dtype}"
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("implementation", ["pyllm", "eager"])
def test_generate(benchmark, models, implementation, batch):
    dtype, hf, ours, _ = models
    prompts = torch.randint(0, hf.config.vocab_size, (batch, PROMPT),
                            generator=torch.Generator().manual_seed(2))
    if implementation == "pyllm":
        fn = lambda: ours.generate(prompts, NEW_TOKENS)  # noqa: E731
    else:
        fn = lambda: hf.generate(prompts, max_new_tokens=NEW_TOKENS,  # noqa: E731
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    benchmark.group = f"gpt2-small generate B{batch} {PROMPT}+{NEW_TOKENS} {dtype}"
    benchmark.pedantic(fn, rounds=2, warmup_rounds=0)
