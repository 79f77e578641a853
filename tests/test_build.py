"""The compiled extensions: what was built, that it matches the running torch,
and what the GPU machine code of pyllm._C_cuda uses (read without a GPU)."""

import glob
import os

import pytest
import torch

import pyllm
from gpu_binaries import SHARED_LIMIT, cuobjdump, list_elf, resource_usage
from pyllm import _C, _extension

BUILD = _extension.build_info()
ISAS = ("generic", "avx2", "avx512", "avx512_bf16")


def test_build_record_matches_running_torch():
    assert BUILD["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert BUILD["cxx11_abi"] == torch.compiled_with_cxx11_abi()


def test_cpu_isa_is_chosen_at_run_time():
    assert _C.cpu_isa_detected() in ISAS
    assert ISAS.index(_C.cpu_isa()) <= ISAS.index(_C.cpu_isa_detected())


@pytest.mark.parametrize("problem, running", [
    ("built against torch 2.13.0", ("2.12.0", None, True)),
    ("running a CPU-only torch", ("2.14.1", None, True)),
    ("built against CUDA 13.0, running torch with CUDA 12.8", ("2.14.1+cu128", "12.8", True)),
    ("_GLIBCXX_USE_CXX11_ABI=1, running torch uses 0", ("2.14.1", "13.0", False)),
])
def test_mismatched_torch_is_a_clear_import_error(problem, running):
    recorded = {"torch_version": "2.14.1+cu130", "torch_cuda_version": "13.0", "cxx11_abi": True,
                "with_cuda": True, "cuda_archs": ["8.0", "9.0"]}
    if "2.13.0" in problem:
        recorded = {**recorded, "torch_version": "2.13.0+cpu", "with_cuda": False}
    with pytest.raises(_extension.BuildMismatchError) as info:
        _extension.check(recorded, *running)
    message = str(info.value)
    assert problem in message and "pip install --no-build-isolation" in message
    assert isinstance(info.value, ImportError)


def test_matching_torch_passes_the_check():
    _extension.check(BUILD, torch.__version__, torch.version.cuda, torch.compiled_with_cxx11_abi())


needs_cuda_build = pytest.mark.skipif(not BUILD["with_cuda"], reason="CPU-only build of pyllm")
needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump not found (install triton)")


@needs_cuda_build
def test_cuda_extension_loaded_without_a_device():
    assert _extension.has_cuda_extension()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyllm::rms_norm", "CUDA")
    if not torch.cuda.is_available():
        status = pyllm.backends()["cuda"]
        assert not status.available and "no CUDA device" in status.detail


def _cuda_library():
    return glob.glob(os.path.join(os.path.dirname(pyllm.__file__), "_C_cuda*.so"))[0]


@needs_cuda_build
@needs_cuobjdump
def test_cubins_for_exactly_the_requested_archs():
    wanted = {int(a.replace("+PTX", "").replace(".", "")) for a in BUILD["cuda_archs"]}
    found = {int(name.split(".sm_")[1].split(".")[0]) for name in list_elf(_cuda_library())}
    assert found == wanted


# Every CUDA kernel family, by a piece of its (mangled) name.
CUDA_KERNELS = ("norm_forward_kernel", "norm_backward_kernel", "column_sum_kernel", "gemm_kernel",
                "attention_forward_kernel", "attention_combine_kernel",
                "attention_backward_kv_kernel", "attention_backward_q_kernel")


@needs_cuda_build
@needs_cuobjdump
def test_every_cuda_kernel_is_built_for_every_arch():
    usage = resource_usage(_cuda_library())
    for arch in {int(a.replace("+PTX", "").replace(".", "")) for a in BUILD["cuda_archs"]}:
        names = [k["function"] for k in usage if k["arch"] == arch]
        for kernel in CUDA_KERNELS:
            assert any(kernel in n for n in names), f"{kernel} missing for sm_{arch}"
        # fp16 and bf16 GEMMs, each with the cp.async and the element-load path,
        # for the three tile configurations
        assert sum("gemm_kernel" in n for n in names) == 2 * 2 * 3


@needs_cuda_build
@needs_cuobjdump
def test_cuda_kernels_do_not_spill():
    usage = resource_usage(_cuda_library())
    assert usage, "no kernels found in pyllm._C_cuda"
    for kernel in usage:
        name = f"{kernel['function']} (sm_{kernel['arch']})"
        assert kernel["LOCAL"] == 0 and kernel["STACK"] == 0, f"{name} spills: {kernel}"
        assert kernel["REG"] <= 255, name
        assert kernel["SHARED"] <= SHARED_LIMIT.get(kernel["arch"], 48 * 1024), name
