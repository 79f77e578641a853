"""Every Triton kernel compiled ahead of time to real cubin for sm_80 and
sm_90, for each dtype and each configuration its launcher can pick (the block
sizes of the norms, the autotune lists of the GEMM and attention kernels): it
must compile, fit the target's shared memory and not spill registers. This is
the proof for bf16, which the interpreter can't run faithfully, and for the
code paths the interpreter runs differently from a GPU.

With PYLLM_TRITON_RESOURCES=<file> each compiled kernel appends a line to
<file> (kernel, arch, warps, stages, registers, shared bytes, constexprs): the
resource table of the shipped configurations.
"""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

from gpu_binaries import SHARED_LIMIT, compile_triton  # noqa: E402

ARCHS = (80, 90)
TYPES = {"float16": ("fp16", 2), "bfloat16": ("bf16", 2)}


def check(kernel, signature, constexprs, arch, num_warps, num_stages=3, divisible=()):
    compiled, usage = compile_triton(kernel, signature, constexprs, arch, num_warps, num_stages,
                                     divisible)
    assert usage["LOCAL"] == 0 and usage["SPILL"] == 0, f"register spills: {usage}"
    assert usage["REG"] <= 255, usage
    assert compiled.metadata.shared <= SHARED_LIMIT[arch], compiled.metadata.shared
    report = os.environ.get("PYLLM_TRITON_RESOURCES")
    if report:
        described = " ".join(f"{k}={v}" for k, v in constexprs.items())
        with open(report, "a") as f:
            dtype = next((v[1:] for v in signature.values() if v in ("*fp16", "*bf16")), "")
            f.write(f"{kernel.__name__}\tsm_{arch}\t{dtype}\t{num_warps}\t{num_stages}"
                    f"\t{usage['REG']}\t{compiled.metadata.shared}\t{described}\n")
    return usage


# -- norms -------------------------------------------------------------------------

def norm_forward_configs():
    from pyllm.kernels.norm import SINGLE_PASS_ELEMENTS, forward_config

    for dtype in TYPES:
        largest = SINGLE_PASS_ELEMENTS
        sizes = [1 << i for i in range(largest.bit_length())] + [largest + 1]
        seen = set()
        for n in sizes:
            config = forward_config(n)
            key = tuple(sorted(config.items()))
            if key not in seen:
                seen.add(key)
                yield dtype, config


def norm_backward_configs():
    from pyllm.kernels.norm import backward_config

    for dtype in TYPES:
        seen = set()
        for n in [1 << i for i in range(14)] + [8193]:
            config = backward_config(n)
            key = tuple(sorted(config.items()))
            if key not in seen:
                seen.add(key)
                yield dtype, config


def _ids(value):
    if isinstance(value, dict):
        return "-".join(f"{k}{v}" for k, v in value.items())
    return str(value)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, config", list(norm_forward_configs()), ids=_ids)
def test_norm_forward_compiles(dtype, config, arch):
    from pyllm.kernels.norm import norm_forward_kernel

    t = TYPES[dtype][0]
    signature = {"X": f"*{t}", "R": f"*{t}", "W": f"*{t}", "B": f"*{t}", "Y": f"*{t}",
                 "S": f"*{t}", "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i64",
                 "stride_r": "i64", "stride_y": "i64", "stride_s": "i64", "N": "i32",
                 "eps": "fp32", "IS_RMS": "constexpr", "HAS_RESIDUAL": "constexpr",
                 "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr",
                 "SINGLE_PASS": "constexpr"}
    for rms in (False, True):
        constexprs = {"IS_RMS": rms, "HAS_RESIDUAL": True, "HAS_WEIGHT": True,
                      "HAS_BIAS": not rms, "BLOCK_N": config["BLOCK_N"],
                      "SINGLE_PASS": config["SINGLE_PASS"]}
        check(norm_forward_kernel, signature, constexprs, arch, config["num_warps"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, config", list(norm_backward_configs()), ids=_ids)
def test_norm_backward_compiles(dtype, config, arch):
    from pyllm.kernels.norm import column_sum_kernel, norm_backward_kernel

    t = TYPES[dtype][0]
    signature = {"DY": f"*{t}", "X": f"*{t}", "W": f"*{t}", "MEAN": "*fp32", "RSTD": "*fp32",
                 "DSUM": f"*{t}", "DX": f"*{t}", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32",
                 "stride_dy": "i64", "stride_x": "i64", "stride_dsum": "i64", "stride_dx": "i64",
                 "M": "i32", "N": "i32", "rows_per_program": "i32", "IS_RMS": "constexpr",
                 "HAS_WEIGHT": "constexpr", "HAS_DSUM": "constexpr", "WANT_DX": "constexpr",
                 "WANT_PARAMS": "constexpr", "BLOCK_N": "constexpr", "SINGLE_PASS": "constexpr"}
    constexprs = {"IS_RMS": False, "HAS_WEIGHT": True, "HAS_DSUM": True, "WANT_DX": True,
                  "WANT_PARAMS": True, "BLOCK_N": config["BLOCK_N"],
                  "SINGLE_PASS": config["SINGLE_PASS"]}
    check(norm_backward_kernel, signature, constexprs, arch, config["num_warps"])
    check(column_sum_kernel, {"P": "*fp32", "OUT": f"*{t}", "rows": "i32", "N": "i32",
                              "BLOCK_R": "constexpr", "BLOCK_N": "constexpr"},
          {"BLOCK_R": 16, "BLOCK_N": 256}, arch, 4)


# -- GEMM -------------------------------------------------------------------------

#: The operand layouts the launchers produce (kernels/linear.py): which strides
#: are 1 (Triton specializes an int argument equal to 1 as a constant).
GEMM_LAYOUTS = {
    "x @ W^T": ("stride_ak", "stride_bk", "stride_cn", "stride_gn"),  # forward, dz
    "dz @ W": ("stride_ak", "stride_bn", "stride_cn", "stride_gn"),   # grad x
    "dz^T @ x": ("stride_am", "stride_bn", "stride_cn", "stride_gn"),  # grad W
}


def _matmul_signature(t, unit_strides, out="same"):
    o = t if out == "same" else out
    pointers = {"A": t, "B": t, "B2": t, "BIAS": t, "BIAS2": t, "C": o, "C2": o, "GY": t}
    signature = {name: f"*{kind}" for name, kind in pointers.items()}
    signature.update({name: "i32" for name in ("M", "N", "K", "M_BUCKET")})
    # Triton types an int argument by its value: strides below 2**31 are i32.
    for name in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn",
                 "stride_gm", "stride_gn"):
        signature[name] = "constexpr" if name in unit_strides else "i32"
    signature.update({name: "constexpr" for name in ("ACT", "EPILOGUE", "HAS_BIAS", "BLOCK_M",
                                                     "BLOCK_N", "BLOCK_K", "GROUP_M")})
    return signature


def gemm_cases():
    from pyllm.kernels import linear

    one = [("x @ W^T", linear.STORE, 1), ("x @ W^T", linear.GRAD_ACT, 2),
           ("dz @ W", linear.STORE, 0), ("dz^T @ x", linear.STORE, 0)]
    two = [("x @ W^T", linear.SWIGLU, 0), ("x @ W^T", linear.GRAD_SWIGLU, 0)]
    for dtype in TYPES:
        for i, config in enumerate(linear.CONFIGS):
            for layout, epilogue, act in one:
                yield dtype, f"one{i}", config, layout, epilogue, act
        for i, config in enumerate(linear.CONFIGS_TWO):
            for layout, epilogue, act in two:
                yield dtype, f"two{i}", config, layout, epilogue, act
        yield dtype, "accumulate", linear.ACCUMULATE_CONFIG, "dz @ W", linear.ACCUMULATE, 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, name, config, layout, epilogue, act",
                         list(gemm_cases()) if importlib.util.find_spec("triton") else [],
                         ids=lambda v: v if isinstance(v, str) else str(v)
                         if not hasattr(v, "kwargs") else "")
def test_gemm_compiles(dtype, name, config, layout, epilogue, act, arch):
    from pyllm.kernels import linear

    t = TYPES[dtype][0]
    unit = GEMM_LAYOUTS[layout]
    out = "fp32" if epilogue == linear.ACCUMULATE else "same"
    constexprs = dict(config.kwargs, ACT=act, EPILOGUE=epilogue, HAS_BIAS=True,
                      **{name: 1 for name in unit})
    divisible = ("A", "B", "B2", "BIAS", "BIAS2", "C", "C2", "GY", "N", "K", "stride_am",
                 "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_gm")
    check(linear._matmul_kernel, _matmul_signature(t, unit, out), constexprs, arch,
          config.num_warps, config.num_stages, divisible)


# -- attention ------------------------------------------------------------------------

BLOCK_DS = (32, 64, 128, 256)  # head_dim 32; 40 and 64; 80, 96 and 128; 256
_ATTENTION_STRIDES = ("stride_qb", "stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh",
                      "stride_vb", "stride_vt", "stride_vh", "stride_ob", "stride_ot", "stride_oh",
                      "stride_bb", "stride_bh", "stride_bq", "stride_bk", "stride_lb", "stride_lh")


def _attention_signature(t, pointers, scalars, flags):
    signature = {name: f"*{kind if kind != 'x' else t}" for name, kind in pointers}
    signature.update({name: "i32" for name in _ATTENTION_STRIDES})
    signature.update(scalars)
    signature.update({name: "constexpr" for name in flags})
    return signature


_FLAGS = ("IS_VARLEN", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "HAS_BIAS", "HAS_ALIBI",
          "BLOCK_M", "BLOCK_N", "BLOCK_D", "D_MULTIPLE")
#: Every variant at once (a window on both sides, softcap, a bias, ALiBi):
#: the most registers any call needs, the case the no-spill check must hold for.
_VARIANT = dict(WINDOW_LEFT=True, WINDOW_RIGHT=True, SOFTCAP=True, HAS_BIAS=True, HAS_ALIBI=True)
_NO_ALIBI = dict(_VARIANT, HAS_ALIBI=False)
_VARIANT_SCALARS = {"window_left": "i32", "window_right": "i32", "softcap": "fp32",
                    "alibi_stride": "i32"}
_DIVISIBLE = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "PARTIAL", "stride_qt",
              "stride_kt", "stride_vt", "stride_ot", "stride_qb", "stride_kb", "stride_vb",
              "stride_ob", "stride_qh", "stride_kh", "stride_vh", "stride_oh")


def _launch(config):
    return {k: v for k, v in config.items() if k.startswith("BLOCK")}, config["num_warps"], \
        config["num_stages"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("block_d", BLOCK_DS)
@pytest.mark.parametrize("split", [False, True], ids=["prefill", "decode"])
def test_attention_forward_compiles(split, block_d, dtype, arch):
    from pyllm.kernels import attention

    configs = [(attention.forward_config(block_d), _VARIANT)] if not split else [
        (attention.decode_config(block_d), _NO_ALIBI),
        (attention.decode_config(block_d, alibi=True), _VARIANT)]
    for config, variant in configs:
        _check_attention_forward(split, block_d, dtype, arch, config, variant)


def _forward_signature(t):
    pointers = [("Q", "x"), ("K", "x"), ("V", "x"), ("BIAS", "x"), ("ALIBI", "fp32"), ("O", "x"),
                ("LSE", "fp32"), ("CU_Q", "i32"), ("CU_K", "i32"), ("PARTIAL", "fp32"),
                ("TABLE", "i32")]
    scalars = {"seq_q": "i32", "seq_k": "i32", "group": "i32", "head_dim": "i32",
               "scale": "fp32", "keys_per_split": "i32", **_VARIANT_SCALARS,
               "table_stride": "i32", "page_size": "i32"}
    return _attention_signature(t, pointers, scalars, _FLAGS + ("SPLIT", "PAGED", "ALIGN_KEYS"))


def _check_attention_forward(split, block_d, dtype, arch, config, variant):
    from pyllm.kernels import attention

    blocks, warps, stages = _launch(config)
    signature = _forward_signature(TYPES[dtype][0])
    # dense, varlen, and varlen over a paged KV cache (the block table's lookup per key);
    # the varlen prefills in batch-invariant mode (ALIGN_KEYS: aligned window blocks)
    for varlen, paged in ((False, False), (True, False), (True, True)):
        constexprs = dict(blocks, IS_VARLEN=varlen, SPLIT=split, BLOCK_D=block_d, D_MULTIPLE=16,
                          PAGED=paged, ALIGN_KEYS=varlen and not split, **variant)
        check(attention.attention_forward_kernel, signature, constexprs, arch, warps, stages,
              _DIVISIBLE)
    if split:
        combine = {"PARTIAL": "*fp32", "O": f"*{TYPES[dtype][0]}", "LSE": "*fp32", "CU_Q": "*i32",
                   "stride_ob": "i32", "stride_ot": "i32", "stride_oh": "i32", "stride_lb": "i32",
                   "stride_lh": "i32", "seq_q": "i32", "head_dim": "i32", "splits": "i32",
                   "IS_VARLEN": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"}
        check(attention.attention_combine_kernel, combine,
              {"IS_VARLEN": False, "BLOCK_M": blocks["BLOCK_M"], "BLOCK_D": block_d}, arch, 4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("block_d", BLOCK_DS)
@pytest.mark.parametrize("which", ["kv", "q"])
def test_attention_backward_compiles(which, block_d, dtype, arch):
    from pyllm.kernels import attention

    # each tile set compiled with every variant it serves
    causal = dict(WINDOW_LEFT=False, WINDOW_RIGHT=True, SOFTCAP=False, HAS_BIAS=True,
                  HAS_ALIBI=False)
    windows = dict(_NO_ALIBI, SOFTCAP=False)
    if which == "kv":  # narrower tiles under any window, softcap or ALiBi
        alibi = attention.backward_kv_config(block_d, alibi=True)
        configs = [(attention.backward_kv_config(block_d), causal),
                   (attention.backward_kv_config(block_d, variant=True), windows),
                   (attention.backward_kv_config(block_d, variant=True, softcap=True), _NO_ALIBI),
                   (alibi, dict(causal, HAS_ALIBI=True)), (alibi, dict(windows, HAS_ALIBI=True)),
                   (alibi, _VARIANT)]
    else:  # narrower tiles under a softcap (ALiBi among the flags of both)
        windows = dict(_VARIANT, SOFTCAP=False)
        configs = [(attention.backward_q_config(block_d), windows),
                   (attention.backward_q_config(block_d, softcap=True), _VARIANT)]
    for config, flags in configs:
        _check_attention_backward(which, block_d, dtype, arch, config, flags)


def _check_attention_backward(which, block_d, dtype, arch, config, flags):
    from pyllm.kernels import attention

    blocks, warps, stages = _launch(config)
    grads = [("DK", "x"), ("DV", "x")] if which == "kv" else [("DQ", "x")]
    pointers = [("Q", "x"), ("K", "x"), ("V", "x"), ("DO", "x"), ("BIAS", "x"), ("ALIBI", "fp32"), ("LSE", "fp32"),
                ("DELTA", "fp32"), *grads, ("CU_Q", "i32"), ("CU_K", "i32")]
    scalars = {"seq_q": "i32", "seq_k": "i32", "group": "i32", "head_dim": "i32",
               "scale": "fp32", **_VARIANT_SCALARS}
    signature = _attention_signature(TYPES[dtype][0], pointers, scalars, _FLAGS)
    kernel = (attention.attention_backward_kv_kernel if which == "kv"
              else attention.attention_backward_q_kernel)
    constexprs = dict(blocks, IS_VARLEN=False, BLOCK_D=block_d, D_MULTIPLE=16, **flags)
    check(kernel, signature, constexprs, arch, warps, stages, _DIVISIBLE)


# -- 64-bit strides ------------------------------------------------------------------
# Triton types an int argument by its value: a stride of 2**31 or more (a
# slice of a KV cache whose batch entries are that far apart) arrives as i64.
# The attention kernels form every base offset in 64 bits (program index
# .to(tl.int64) times the stride). (The GEMM's launchers never pass such
# strides: x and the output are made 2-D contiguous and a CUDA operand past
# 2**31 elements is refused; compiled with i64 row strides anyway, it spills
# on sm_90 with Triton 3.8 and Triton 3.9's ptxas rejects it.) The CPU tests
# past 2**31 elements are in tests/test_large_tensors.py.

@pytest.mark.parametrize("arch", ARCHS)
def test_attention_compiles_with_64bit_batch_strides(arch):
    from pyllm.kernels import attention

    config = attention.forward_config(128)
    blocks, warps, stages = _launch(config)
    signature = _forward_signature("bf16")
    for name in ("stride_qb", "stride_kb", "stride_vb", "stride_ob", "stride_bb", "stride_lb"):
        signature[name] = "i64"
    constexprs = dict(blocks, IS_VARLEN=False, WINDOW_LEFT=False, WINDOW_RIGHT=True,
                      SOFTCAP=False, HAS_BIAS=True, HAS_ALIBI=False, SPLIT=False, BLOCK_D=128,
                      D_MULTIPLE=16, PAGED=False, ALIGN_KEYS=False)
    compiled, _ = compile_triton(attention.attention_forward_kernel, signature, constexprs, arch,
                                 warps, stages, _DIVISIBLE)
    assert "mul.wide" in compiled.asm["ptx"] or "mul.lo.s64" in compiled.asm["ptx"]


# -- rotary ------------------------------------------------------------------------

def _extreme_configs(launch_config, sizes):
    """The distinct launch configurations of an elementwise kernel at the
    narrowest and widest of its two sizes (no spills between: it holds no
    more registers per element in between)."""
    seen = {}
    for a in sizes[0]:
        for b in sizes[1]:
            config = launch_config(a, b)
            seen.setdefault(tuple(sorted(config.items())), config)
    return list(seen.values())


def rotary_configs():
    from pyllm.kernels.rotary import launch_config

    return _extreme_configs(launch_config, ((1, 64), (1, 128)))  # heads, half


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("config", list(rotary_configs()), ids=_ids)
def test_rotary_compiles(config, dtype, arch):
    from pyllm.kernels.rotary import rotary_kernel

    t = TYPES[dtype][0]
    signature = {"X": f"*{t}", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "stride_b": "i64",
                 "stride_s": "i64", "stride_h": "i64", "seq": "i32", "heads": "i32", "half": "i32",
                 "max_positions": "i32", "INTERLEAVED": "constexpr", "CONJUGATE": "constexpr",
                 "BLOCK_H": "constexpr", "BLOCK_P": "constexpr"}
    for interleaved in (False, True):
        constexprs = {"INTERLEAVED": interleaved, "CONJUGATE": interleaved,
                      "BLOCK_H": config["BLOCK_H"], "BLOCK_P": config["BLOCK_P"]}
        check(rotary_kernel, signature, constexprs, arch, config["num_warps"], num_stages=1)


# -- paged-KV append ----------------------------------------------------------------

def paged_kv_configs():
    from pyllm.kernels.paged_kv import launch_config

    return _extreme_configs(launch_config, ((1, 64), (8, 256)))  # heads, head_dim


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("config", list(paged_kv_configs()), ids=_ids)
def test_paged_kv_append_compiles(config, dtype, arch):
    from pyllm.kernels.paged_kv import paged_kv_append_kernel

    t = TYPES[dtype][0]
    signature = {"K": f"*{t}", "V": f"*{t}", "KP": f"*{t}", "VP": f"*{t}", "SLOTS": "*i64",
                 "COS": "*fp32", "SIN": "*fp32", "POS": "*i64",
                 **{name: "i64" for name in ("stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                             "stride_kpp", "stride_kpt", "stride_kph",
                                             "stride_vpp", "stride_vpt", "stride_vph")},
                 "heads": "i32", "head_dim": "i32", "page_size": "i32", "half": "i32",
                 "ROTARY": "constexpr", "INTERLEAVED": "constexpr", "BLOCK_H": "constexpr",
                 "BLOCK_D": "constexpr"}
    for rotary, interleaved in ((False, False), (True, False), (True, True)):
        constexprs = {"ROTARY": rotary, "INTERLEAVED": interleaved,
                      "BLOCK_H": config["BLOCK_H"], "BLOCK_D": config["BLOCK_D"]}
        check(paged_kv_append_kernel, signature, constexprs, arch, config["num_warps"],
              num_stages=1)


# -- cross-entropy -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", list(TYPES))
@pytest.mark.parametrize("vocab", [7, 1000, 128256])
def test_cross_entropy_compiles(vocab, dtype, arch):
    from pyllm.kernels.cross_entropy import cross_entropy_kernel, launch_config

    t = TYPES[dtype][0]
    config = launch_config(vocab)
    signature = {"LOGITS": f"*{t}", "TARGET": "*i64", "LOSS": "*fp32", "LSE": "*fp32",
                 "GRAD": f"*{t}", "stride": "i64", "vocab": "i32", "ignore_index": "i64",
                 "smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32",
                 "WANT_GRAD": "constexpr", "CAPPED": "constexpr", "BLOCK": "constexpr"}
    for want_grad, capped in ((True, False), (True, True), (False, False)):
        constexprs = {"WANT_GRAD": want_grad, "CAPPED": capped, "BLOCK": config["BLOCK"]}
        check(cross_entropy_kernel, signature, constexprs, arch, config["num_warps"],
              num_stages=1)
