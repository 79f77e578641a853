"""Builds pyllm's compiled extensions; the package metadata is in pyproject.toml.

Extensions
  pyllm._C       C++ CPU kernels (C++17, torch-free), the operator schemas, the
                 autograd formulas and glue (the standard torch requires),
                 OpenMP on. Each ISA kernel header csrc/cpu/kernels/*_kernel.h
                 is compiled once per instruction set (generic, avx2, avx512,
                 avx512_bf16) from a two-line source generated here (it defines
                 PYLLM_ISA and includes the header), with that set's flags; the
                 variant is chosen at run time from CPUID (csrc/cpu/isa.h).
                 Everything else is compiled for the baseline x86-64 (no
                 -march=native).
  pyllm._C_cuda  CUDA C++ kernels; built when the torch being built against has
                 CUDA and nvcc is found.

Knobs (environment variables)
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.0;9.0" (the default here),
                         honoured exactly; add "+PTX" to an entry to embed PTX.
  MAX_JOBS               parallel compile jobs; default: one per 4.5 GB of
                         available memory, at least 1, at most the CPU count.
  PYLLM_FORCE_CUDA=1     build pyllm._C_cuda even where detection says no.
  PYLLM_SKIP_CUDA=1      never build pyllm._C_cuda.
  PYLLM_VERBOSE_BUILD=1  print every compiler command.
  PYLLM_SANITIZE=1       build pyllm._C with AddressSanitizer and
                         UndefinedBehaviorSanitizer (-O1, frame pointers, own
                         object folder; for `make sanitize`, tools/sanitize.py).
  PYLLM_NO_LOCAL_VERSION=1  version without the "+cu130torch2.14" local part
                         (for an index that refuses local versions).

Version and dependencies are computed here: the version gets a local part
naming what the wheel was built against ("0.1.0+cu130torch2.14",
"0.1.0+cputorch2.13"), and the wheel requires the same torch minor release
("torch>=2.14,<2.15"), the only one whose ABI the extensions match.

The extensions must be built against the torch they run with: the build
backend (build_backend.py) makes a plain `pip install .` or `pip install
pyllm-<ver>.tar.gz` compile against the torch already installed in the target
environment (torch 2.11 to 2.15); `pip install --no-build-isolation .` builds
against the current environment's torch.
"""

import glob
import os
import platform
import re
import shutil
import sys
import sysconfig

from setuptools import setup

# The supported torch range, written once (next to the build backend).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_backend import SUPPORTED_TORCH_REQUIREMENT, is_supported  # noqa: E402


def locate_cuda_home():
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the toolkit around nvcc on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    if shutil.which("nvcc"):
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
                os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if locate_cuda_home() is not None:
    os.environ["CUDA_HOME"] = locate_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")

# Flags per instruction set (the namespace PYLLM_ISA names). Each generated
# variant is compiled with its set's flags only; the code that calls into it
# checks CPUID first.
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
    # AMX (tile) instructions compiled in, run only where isa.cpp's
    # amx_usable() says the CPU and OS allow them.
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                    "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mprefer-vector-width=512"],
}
ISA_KERNEL_HEADERS = os.path.join("csrc", "cpu", "kernels", "*_kernel.h")
ISA_SOURCES_DIR = os.path.join("build", "isa_sources")
# The kernel files include no torch header, so they stay C++17.
# -ffp-contract=off: the kernels fuse multiply-adds where they say fma(), and
# nowhere else (GCC would otherwise contract its vector intrinsics, and
# g - c1 with g = dy * w becomes the rounding error of dy * w instead of 0).
# -Wno-(maybe-)uninitialized: GCC 12 warns falsely inside its own AVX-512 headers.
ISA_KERNEL_FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd", "-ffp-contract=off",
                    "-Wno-maybe-uninitialized", "-Wno-uninitialized"]


def base_version():
    """pyllm/__init__.py's __version__ (the one place it is written)."""
    with open(os.path.join(ROOT, "pyllm", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def torch_release():
    """(major, minor) of the torch being built against."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def build_tag(with_cuda):
    """'cu130torch2.14' or 'cputorch2.13': what the extensions are built against."""
    major, minor = torch_release()
    device = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda and torch.version.cuda else "cpu"
    return f"{device}torch{major}.{minor}"


# An sdist is built against nothing: a plain version and the supported range.
BUILDING_SDIST = "sdist" in sys.argv[1:]
if not is_supported(torch.__version__):
    sys.exit(f"pyllm: torch {torch.__version__} is not supported; pyllm builds against "
             f"{SUPPORTED_TORCH_REQUIREMENT} (one build per minor release)")


def version(with_cuda):
    if env_flag("PYLLM_NO_LOCAL_VERSION") or BUILDING_SDIST:
        return base_version()
    return f"{base_version()}+{build_tag(with_cuda)}"


def install_requires():
    if BUILDING_SDIST:
        return [SUPPORTED_TORCH_REQUIREMENT, "numpy"]
    major, minor = torch_release()
    return [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"]


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def isa_sources():
    """{isa: [generated source per kernel header]}: for each
    csrc/cpu/kernels/<name>_kernel.h and each instruction set, a source file
    build/isa_sources/<name>_<isa>.cpp that defines PYLLM_ISA and includes the
    header (rewritten only when its text changes, so ninja keeps its objects)."""
    out_dir = os.path.join(ROOT, ISA_SOURCES_DIR)
    os.makedirs(out_dir, exist_ok=True)
    sources = {}
    for header in sorted(glob.glob(os.path.join(ROOT, ISA_KERNEL_HEADERS))):
        name = os.path.basename(header)[:-len("_kernel.h")]
        include = os.path.relpath(header, os.path.join(ROOT, "csrc")).replace(os.sep, "/")
        for isa in ISA_FLAGS:
            path = os.path.join(out_dir, f"{name}_{isa}.cpp")
            text = (f"// Generated by setup.py: {include} compiled for {isa}.\n"
                    f"#define PYLLM_ISA {isa}\n#include \"{include}\"\n")
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            sources.setdefault(isa, []).append(os.path.relpath(path, ROOT))
    return sources


def default_max_jobs():
    """One compile job per 4.5 GB of available memory, at least 1."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available_gb = int(info["MemAvailable"].split()[0]) / 1024**2
        by_memory = int(available_gb // 4.5)
    except (OSError, KeyError, ValueError):
        by_memory = 1
    return max(1, min(by_memory, os.cpu_count() or 1))


def want_cuda():
    if env_flag("PYLLM_SKIP_CUDA"):
        return False, "PYLLM_SKIP_CUDA is set"
    if env_flag("PYLLM_FORCE_CUDA"):
        return True, "PYLLM_FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


# Files that include torch headers get the C++ standard torch requires (C++20
# for torch 2.14), added by BuildExtension.
# -g0: no debug information (Python's own flags ask for -g, which made the
# libraries several times larger).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden", "-DNDEBUG",
             "-Wall", "-Wno-unknown-pragmas"]
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr"]
SANITIZE = env_flag("PYLLM_SANITIZE")
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g1"]
if SANITIZE:
    # -O1 after -O3: the last one counts; NDEBUG stays (the asserts are the tests').
    # The kernel files too (at -O3 under ASan the GEMM file alone compiles in
    # 80 s, at -O1 in 6 s).
    CXX_FLAGS = CXX_FLAGS + ["-O1"] + SANITIZER_FLAGS
    ISA_KERNEL_FLAGS = ISA_KERNEL_FLAGS + ["-O1"]


def headers():
    """Every header: setuptools relinks an extension only when one of its
    sources or `depends` is newer than it (ninja then recompiles what changed)."""
    return relative(glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True) +
                    glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True))


def cpu_extension():
    sources = (glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) +
               glob.glob(os.path.join(ROOT, "csrc", "autograd", "*.cpp")) +
               glob.glob(os.path.join(ROOT, "csrc", "cpu", "**", "*.cpp"), recursive=True))
    generated = isa_sources()
    ext = CppExtension(
        name="pyllm._C",
        sources=relative(sources),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"] + (SANITIZER_FLAGS if SANITIZE else []),
        depends=headers() + [p for group in generated.values() for p in group],
    )
    ext.isa_sources = generated
    return ext


def cuda_extension():
    sources = relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) +
                       glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    return CUDAExtension(
        name="pyllm._C_cuda",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        depends=headers(),
    )


class BuildPyllm(BuildExtension):
    """torch's BuildExtension (ninja), plus per-file ISA flags and a build record."""

    def finalize_options(self):
        super().finalize_options()
        # One object folder for every way of building from this tree (pip's
        # editable install, `setup.py build_ext --inplace`): ninja then
        # recompiles only what changed instead of everything per build.
        # Objects compiled against one torch are never reused for another.
        self.build_temp = os.path.join(
            ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}-"
            f"{build_tag(torch.version.cuda is not None)}{'-sanitize' if SANITIZE else ''}")

    def build_extension(self, ext):
        for isa, sources in sorted(getattr(ext, "isa_sources", {}).items()):
            flags = ISA_FLAGS[isa] if IS_X86 else []
            cxx = list(ext.extra_compile_args["cxx"]) + ISA_KERNEL_FLAGS + flags
            ext.extra_objects += self.compiler.compile(
                sources, output_dir=self.build_temp, include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx}, depends=ext.depends)
        super().build_extension(ext)

    def run(self):
        package_dir = os.path.dirname(self.get_ext_fullpath("pyllm._C"))
        if built_against(os.path.join(package_dir, "_build_info.py")) != torch.__version__:
            # The libraries there (if any) were linked against another torch:
            # setuptools would keep them, as no source is newer than they are.
            self.force = True
        super().run()
        if not any(e.name == "pyllm._C_cuda" for e in self.extensions):
            # a CPU-only build must not ship a CUDA library left by an earlier build
            for stale in glob.glob(os.path.join(package_dir, "_C_cuda*")):
                os.remove(stale)
        write_build_info(os.path.join(package_dir, "_build_info.py"),
                         with_cuda=any(e.name == "pyllm._C_cuda" for e in self.extensions))


def built_against(record_path):
    """The torch version a build record names, or None without a record."""
    try:
        with open(record_path) as f:
            match = re.search(r"'torch_version': '([^']+)'", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def write_build_info(path, with_cuda):
    """Records what the extensions were built against, read at import time."""
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";") if with_cuda else []
    nvcc_version = None
    if with_cuda and CUDA_HOME is not None:
        import subprocess
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True).stdout
        nvcc_version = next((line.split("release")[-1].split(",")[0].strip()
                             for line in out.splitlines() if "release" in line), None)
    record = {
        "pyllm_version": version(with_cuda),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "with_cuda": with_cuda,
        "cuda_archs": [a for a in archs if a],
        "nvcc_version": nvcc_version,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write('"""What pyllm\'s extensions were built against (written by setup.py)."""\n\n')
        f.write(f"BUILD = {record!r}\n")


def extensions():
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    print(f"pyllm: MAX_JOBS={os.environ['MAX_JOBS']}", file=sys.stderr)
    exts = [cpu_extension()]
    build_cuda, why = want_cuda()
    if SANITIZE:
        build_cuda, why = False, "PYLLM_SANITIZE is set: the sanitized build is CPU-only"
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        print(f"pyllm: building pyllm._C_cuda for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} ({why})", file=sys.stderr)
        exts.append(cuda_extension())
    else:
        print(f"pyllm: building CPU-only, without pyllm._C_cuda ({why})", file=sys.stderr)
    return exts


if env_flag("PYLLM_VERBOSE_BUILD"):
    os.environ.setdefault("VERBOSE", "1")

EXTENSIONS = extensions()

setup(
    version=version(any(e.name == "pyllm._C_cuda" for e in EXTENSIONS)),
    install_requires=install_requires(),
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildPyllm.with_options(
        use_ninja=True, no_python_abi_suffix=False)},
)
