"""The Triton kernels compiled ahead of time to real cubin for sm_80 and sm_90,
for each dtype and each block configuration the launchers can pick: it must
compile, fit the target's shared memory and not spill registers. This is the
proof for bf16, which the interpreter can't run faithfully."""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

from gpu_binaries import SHARED_LIMIT, compile_triton  # noqa: E402

ARCHS = (80, 90)
TRITON_TYPES = {"float32": ("fp32", 4), "float16": ("fp16", 2), "bfloat16": ("bf16", 2)}


def rms_norm_configs():
    from pyllm.kernels.rms_norm import SINGLE_PASS_BYTES, forward_config

    for dtype, (_, size) in TRITON_TYPES.items():
        largest_single = SINGLE_PASS_BYTES // size
        for n in (1, 1000, 4096, largest_single, largest_single + 1):
            yield dtype, n, forward_config(n, size)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, n, config", list(rms_norm_configs()) if importlib.util.find_spec(
    "triton") else [], ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_rms_norm_forward_compiles(dtype, n, config, arch):
    from pyllm.kernels.rms_norm import rms_norm_forward_kernel

    t = TRITON_TYPES[dtype][0]
    signature = {"X": f"*{t}", "W": f"*{t}", "Y": f"*{t}", "RSTD": "*fp32", "stride_x": "i64",
                 "stride_y": "i64", "N": "i32", "eps": "fp32", "HAS_WEIGHT": "constexpr",
                 "BLOCK_N": "constexpr", "SINGLE_PASS": "constexpr"}
    constexprs = {"HAS_WEIGHT": True, "BLOCK_N": config["BLOCK_N"],
                  "SINGLE_PASS": config["SINGLE_PASS"]}
    compiled, usage = compile_triton(rms_norm_forward_kernel, signature, constexprs, arch,
                                     num_warps=config["num_warps"])
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"register spills: {usage}"
    assert usage["REG"] <= 255
    assert compiled.metadata.shared <= SHARED_LIMIT[arch]
