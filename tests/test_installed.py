"""The pyllm being tested is the one expected, whole: imported from the
expected folder (the source tree in development; an installed wheel's
site-packages under tests/test_wheels.py, which sets PYLLM_EXPECT_PACKAGE_DIR),
its version and build record agree, its compiled extensions and Triton
kernels are there, and every op runs."""

import importlib
import importlib.metadata
import importlib.util
import os

import pytest
import torch

import pyllm
from harness import INSTALLED_PACKAGE_DIR, REPO_ROOT
from pyllm import _extension


def test_imported_from_the_expected_folder():
    expected = INSTALLED_PACKAGE_DIR or os.path.join(REPO_ROOT, "pyllm")
    assert os.path.realpath(os.path.dirname(pyllm.__file__)) == os.path.realpath(expected)


def test_version_and_build_record_agree():
    build = _extension.build_info()
    installed = importlib.metadata.version("pyllm")
    assert installed == build["pyllm_version"], (installed, build)
    assert installed.split("+")[0] == pyllm.__version__
    if "+" in installed:  # the local part names what it was built against
        major, minor = torch.__version__.split(".")[:2]
        device = f"cu{build['torch_cuda_version'].replace('.', '')}" if build["with_cuda"] else "cpu"
        assert installed.split("+")[1] == f"{device}torch{major}.{minor}"
    requires = importlib.metadata.requires("pyllm")
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert f"torch<{major}.{minor + 1},>={major}.{minor}" in requires, requires


def test_compiled_extensions_and_triton_kernels_are_present():
    assert importlib.util.find_spec("pyllm._C") is not None
    build = _extension.build_info()
    has_cuda_library = importlib.util.find_spec("pyllm._C_cuda") is not None
    assert has_cuda_library == build["with_cuda"] == _extension.has_cuda_extension()
    spec = importlib.util.find_spec("pyllm.kernels")  # found, not imported (needs triton)
    (folder,) = spec.submodule_search_locations
    for name in ("__init__", "norm", "linear", "attention"):  # under pyllm, not top-level
        assert os.path.isfile(os.path.join(folder, f"{name}.py")), name
    if importlib.util.find_spec("triton") is not None:  # without it they are never imported
        for name in ("norm", "linear", "attention"):
            importlib.import_module(f"pyllm.kernels.{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_op_runs_against_the_reference(dtype):
    from pyllm import reference
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    torch.testing.assert_close(pyllm.rms_norm(x, w), reference.rms_norm(x, w, 1e-6)[0],
                               atol=2e-2, rtol=2e-2)
    q, k, v = (torch.randn(2, 9, 4, 32, generator=g).to(dtype) for _ in range(3))
    torch.testing.assert_close(pyllm.attention(q, k, v, causal=True),
                               reference.attention(q, k, v, causal=True)[0], atol=2e-2,
                               rtol=2e-2)
    weight = (torch.randn(48, 64, generator=g) / 8).to(dtype)
    torch.testing.assert_close(pyllm.linear(x, weight), torch.nn.functional.linear(x, weight),
                               atol=5e-2, rtol=2e-2)
