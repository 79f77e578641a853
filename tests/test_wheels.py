"""The real artefacts: an sdist, a CUDA wheel (the development torch, CUDA
13 build) and a CPU-only wheel built from that sdist against the CPU torch
2.13.0, each installed into a fresh virtual environment outside the source
tree and tested there with the source tree off sys.path (a missing .so, data
file or Triton kernel not packaged under pyllm fails; the CUDA wheel's
environment reads the development torch through a path file rather than
installing the same torch again); the wheels' contents
(cubins for exactly the requested archs, no copy of torch's or CUDA's
libraries, the torch pin, the local version) and the import-time mismatch
error, faked by editing an installed build record.

About 6 minutes on 2 cores (the CPU wheel compiles its extension from the
sdist; the CUDA wheel reuses the development build's objects)."""

import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from gpu_binaries import list_elf
from harness import REPO_ROOT, TESTS_DIR

pytestmark = pytest.mark.slow

CPU_TORCH = "2.13.0"
ARCHS = "8.0;9.0"
# What a test environment needs besides the wheel (the versions of constraints.txt).
TEST_TOOLS = ["pytest==9.2.0", "hypothesis==6.170.15"]
CPU_BUILD_TOOLS = ["setuptools==81.0.0", "wheel==0.48.0", "ninja==1.13.2", "numpy==2.4.6"]
SMOKE_TESTS = ["test_installed.py", "test_norms.py", "test_attention.py"]
LIBRARIES_NOT_SHIPPED = re.compile(r"(libtorch|libc10|libcudart|libcublas|libnvrtc|libcuda|"
                                   r"libgomp|libshm|libnvToolsExt)[^/]*\.so")


def run(cmd, env=None, cwd=None, timeout=1500, check=True):
    result = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=cwd,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def venv(path, *packages):
    run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    if packages:
        run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages])
    return python


def purelib(python):
    """The site-packages folder of this interpreter."""
    return run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
               ).stdout.strip()


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", folder,
         REPO_ROOT])
    run([sys.executable, "-m", "pip", "wheel", REPO_ROOT, "--no-build-isolation", "--no-deps",
         "-w", folder], env={"TORCH_CUDA_ARCH_LIST": ARCHS})
    (sdist,) = folder.glob("pyllm-*.tar.gz")
    build_python = venv(tmp_path_factory.mktemp("cpu-build") / "venv", f"torch=={CPU_TORCH}",
                        *CPU_BUILD_TOOLS)
    run([build_python, "-m", "pip", "wheel", sdist, "--no-build-isolation", "--no-deps", "-w",
         folder], cwd=folder)
    # the CPU smoke test installs the CPU wheel into this environment (its
    # torch is the one the wheel names): one CPU torch install, not two
    (folder / "cpu-build-python").write_text(str(build_python))
    return folder


def venv_sharing_torch(path):
    """A fresh virtual environment that sees this environment's torch (and
    test tools) through a path file in place of a second 2.7 GB install of
    the same CUDA torch: only the directory holding torch is added, whose
    path files are not read, so this tree's editable pyllm stays out."""
    python = venv(path)
    shared = os.path.dirname(os.path.dirname(torch.__file__))
    (Path(purelib(python)) / "shared_torch.pth").write_text(shared + "\n")
    found = run([python, "-c", "import torch, pyllm"], cwd=path, check=False)
    assert "No module named 'pyllm'" in found.stderr, found.stderr  # not the source tree's
    return python


def wheel(dist, tag):
    (path,) = dist.glob(f"pyllm-*+{tag}-*.whl")
    return path


def cuda_tag():
    major, minor = torch.__version__.split(".")[:2]
    return f"cu{torch.version.cuda.replace('.', '')}torch{major}.{minor}"


def metadata(path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_string(z.read(name).decode())


def test_sdist_has_every_source(dist):
    (sdist,) = dist.glob("pyllm-*.tar.gz")
    assert re.fullmatch(r"pyllm-\d+\.\d+\.\d+\.tar\.gz", sdist.name)  # no local version
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tree = {os.path.relpath(os.path.join(d, f), REPO_ROOT)
            for top in ("csrc", "kernels", "pyllm") for d, _, files in
            os.walk(os.path.join(REPO_ROOT, top)) for f in files
            if f.endswith((".h", ".cuh", ".cpp", ".cu", ".py")) and f != "_build_info.py"}
    assert tree - names == set()
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= names


def test_cuda_wheel_contents(dist):
    path = wheel(dist, cuda_tag())
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        (cuda_lib,) = [n for n in names if re.fullmatch(r"pyllm/_C_cuda\..*so", n)]
        lib = dist / "_C_cuda.so"
        lib.write_bytes(z.read(cuda_lib))
        record = z.read("pyllm/_build_info.py").decode()
    assert any(re.fullmatch(r"pyllm/_C\..*so", n) for n in names)
    assert {f"pyllm/kernels/{k}.py" for k in ("norm", "linear", "attention")} <= set(names)
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
    assert not [n for n in names if LIBRARIES_NOT_SHIPPED.search(n)]
    assert "'with_cuda': True" in record and "'cuda_archs': ['8.0', '9.0']" in record
    elves = list_elf(str(lib))
    assert {re.search(r"sm_\d+", e).group() for e in elves} == {"sm_80", "sm_90"}, elves
    meta = metadata(path)
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert meta["Version"].endswith(f"+{cuda_tag()}")
    assert f"torch<{major}.{minor + 1},>={major}.{minor}" in meta.get_all("Requires-Dist")


def test_cpu_wheel_contents(dist):
    path = wheel(dist, "cputorch2.13")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        record = z.read("pyllm/_build_info.py").decode()
    assert not any("_C_cuda" in n or n.endswith((".cu", ".cubin", ".fatbin")) for n in names)
    assert not [n for n in names if LIBRARIES_NOT_SHIPPED.search(n)]
    assert "'with_cuda': False" in record and "'torch_version': '2.13.0+cpu'" in record
    assert "torch<2.14,>=2.13" in metadata(path).get_all("Requires-Dist")


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_installed_wheel_passes_the_smoke_tests(dist, tmp_path, kind):
    path = wheel(dist, "cputorch2.13" if kind == "cpu" else cuda_tag())
    if kind == "cpu":
        python = (dist / "cpu-build-python").read_text()
        run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *TEST_TOOLS])
    else:
        python = venv_sharing_torch(tmp_path / "venv")
    # (the CUDA wheel's torch is the shared one: no dependency resolution,
    # and the editable pyllm that the shared folder records is not replaced)
    no_deps = ["--no-deps", "--ignore-installed"] if kind == "cuda" else []
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *no_deps, path])
    package = os.path.join(purelib(python), "pyllm")
    workdir = tmp_path / "work"  # neither the source tree nor tests/ is the working folder
    workdir.mkdir()
    result = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "-k", "not every_cpu_isa_path",  # (the main suite forces every ISA)
                  *(os.path.join(TESTS_DIR, t) for t in SMOKE_TESTS)],
                 env={"PYLLM_EXPECT_PACKAGE_DIR": package, "PYTHONPATH": ""}, cwd=workdir)
    assert " passed" in result.stdout and " failed" not in result.stdout
    if kind == "cpu":
        # The import-time check: a build record naming another torch.
        record = os.path.join(package, "_build_info.py")
        text = open(record).read()
        with open(record, "w") as f:
            f.write(text.replace("'torch_version': '2.13.0+cpu'", "'torch_version': '2.12.0+cpu'"))
        failed = subprocess.run([python, "-c", "import pyllm"], capture_output=True, text=True,
                                cwd=workdir)
        assert failed.returncode != 0
        assert "BuildMismatchError" in failed.stderr
        assert "built against torch 2.12.0+cpu, running torch 2.13.0+cpu" in failed.stderr
        assert "Reinstall the pyllm wheel built for this torch" in failed.stderr
