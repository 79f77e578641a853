"""``make sanitize``: pyllm._C built with AddressSanitizer and
UndefinedBehaviorSanitizer, and the CPU op tests and the host-model CUDA
tests run against it.

The sanitized library is built (``PYLLM_SANITIZE=1 setup.py build_ext``, its
own object folder, CPU-only) into a staged copy of the package under
``build/sanitize/``; pytest then imports that copy, with the ASan runtime
preloaded (Python itself is not instrumented) and every finding fatal. The
host model of CUDA (tests/cuda_host/) is compiled with the same sanitizers
(PYLLM_SANITIZE=1 is read by tests/cuda_host_kernels.py). Leak detection is
off: CPython and torch keep their allocations to the end by design.

Usage: python tools/sanitize.py [--quick] [pytest options...]
       python tools/sanitize.py --build-only

--build-only stages and builds the library, nothing else: ``make test``
starts it in the background (at the lowest priority) while the main suite
runs, so that the later run finds its objects built. A lock file keeps two
builds from working on the stage at once; the later run rebuilds only what
changed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = os.path.join(ROOT, "build", "sanitize")
TESTS = [
    "tests/test_norms.py", "tests/test_linear.py", "tests/test_attention.py",
    "tests/test_nonfinite.py", "tests/test_properties.py", "tests/test_memory.py",
    "tests/test_cuda_host_norms.py", "tests/test_cuda_host_linear.py",
    "tests/test_cuda_host_attention.py", "tests/test_cuda_host_nonfinite.py",
    "tests/test_cuda_host_properties.py", "tests/test_rotary.py", "tests/test_cross_entropy.py",
    "tests/test_attention_variants.py", "tests/test_attention_alibi.py",
    "tests/test_attention_paged.py", "tests/test_paged_kv_append.py",
    "tests/test_packed_linear.py", "tests/test_direct_calls.py", "tests/test_direct_decode.py",
]
# --quick (what `make test` runs): per file a -k selection that reaches every
# kernel in few tests: each CPU ISA path forced in a subprocess (norms,
# linear, attention, NaN/Inf), the property tests (odd shapes, strides, empty
# and one-element sizes) on the CPU kernels, and the host model's norm and
# GEMM tests.
QUICK_TESTS = {
    "tests/test_norms.py": "isa", "tests/test_linear.py": "isa",
    "tests/test_attention.py": "isa", "tests/test_nonfinite.py": "isa",
    "tests/test_properties.py": "cpu",
    "tests/test_cuda_host_norms.py": "float16 and not bfloat16", "tests/test_cuda_host_linear.py": "",
    "tests/test_rotary.py": "isa or (forward and float16)",
    "tests/test_cross_entropy.py": "isa or (float16 and all and mean)",
    "tests/test_attention_paged.py": "all and float16",
    "tests/test_paged_kv_append.py": "float16 and interleaved",
    "tests/test_packed_linear.py": "isa or bad_input",
    "tests/test_direct_decode.py": "refused or isa or (equals_the_modules and bfloat16)",
}
# -k: the reference backend and torch.compile run no library code of ours
# that the other tests don't (and are slow under ASan); the RSS test measures
# memory, which ASan's shadow and quarantine inflate.
DESELECT = "not reference and not torch_compile and not inductor and not rss"


def runtime(name: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or "g++"
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        sys.exit(f"sanitize: the compiler has no {name} (install its sanitizer runtimes)")
    return path


def stage_package() -> None:
    """A copy of the Python package (pyllm/ and kernels/ as pyllm.kernels)."""
    target = os.path.join(STAGE, "pyllm")
    if os.path.exists(target):
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py")
    shutil.copytree(os.path.join(ROOT, "pyllm"), target, ignore=ignore)
    kernels = os.path.join(target, "kernels")
    if os.path.exists(kernels):
        shutil.rmtree(kernels)
    shutil.copytree(os.path.join(ROOT, "kernels"), kernels, ignore=ignore)


def build(env: dict) -> None:
    started = time.time()
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", STAGE],
                   cwd=ROOT, env={**env, "PYLLM_SANITIZE": "1"}, check=True)
    print(f"sanitize: built the sanitized pyllm._C in {time.time() - started:.0f} s",
          flush=True)


CANARIES = {  # (what the report must say, source)
    "heap-buffer-overflow": ("-fsanitize=address", r"""
#include <cstdlib>
extern "C" int pyllm_sanitize_canary(int i) {
  int* p = static_cast<int*>(std::malloc(4 * sizeof(int)));
  p[i] = 1;  // i = 4: one past the end
  int r = p[0];
  std::free(p);
  return r;
}
"""),
    "shift exponent": ("-fsanitize=undefined -fno-sanitize-recover=undefined", r"""
extern "C" int pyllm_sanitize_canary(int i) {
  return 1 << (10 * i);  // i = 4: a shift by 40 of a 32-bit int
}
"""),
}


def canary(env: dict) -> None:
    """Proves the set-up reports what it should: a heap overflow (ASan) and an
    undefined shift (UBSan) in libraries built like pyllm._C, called the same
    way, must each abort with the sanitizer's report."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or "g++"
    for i, (report, (flags, code)) in enumerate(CANARIES.items()):
        source = os.path.join(STAGE, f"canary{i}.cpp")
        lib = os.path.join(STAGE, f"libcanary{i}.so")
        with open(source, "w") as f:
            f.write(code)
        subprocess.run([cxx, "-shared", "-fPIC", "-O1", *flags.split(), source, "-o", lib],
                       check=True)
        call = f"import ctypes; ctypes.CDLL({lib!r}).pyllm_sanitize_canary(4)"
        result = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True,
                                text=True, cwd=STAGE)
        if result.returncode == 0 or report not in result.stderr:
            sys.exit(f"sanitize: the canary's {report} went unreported; the sanitizer set-up "
                     f"is broken:\n{result.stderr[-2000:]}")
        print(f"sanitize: the canary's {report} was reported (the set-up works)", flush=True)


def stage_and_build(env: dict) -> None:
    """The staged package with its sanitized library, under a lock: a build
    started in the background (--build-only) is waited for, then brought up
    to date."""
    os.makedirs(STAGE, exist_ok=True)
    with open(os.path.join(os.path.dirname(STAGE), "sanitize.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            stage_package()
            build(env)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    build_only = "--build-only" in argv
    argv = [a for a in argv if a not in ("--quick", "--build-only")]
    env = dict(os.environ)
    stage_and_build(env)
    if build_only:
        return 0
    asan = runtime("libasan.so")
    env.update({
        "PYLLM_SANITIZE": "1",
        "PYTHONPATH": os.pathsep.join([STAGE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        # libstdc++ with it: ASan's __cxa_throw interceptor needs the real one
        # loaded when it starts (python itself does not link libstdc++).
        "LD_PRELOAD": f"{asan} {runtime('libstdc++.so.6')}",
        # the staged copy, for the tests' own subprocesses too (tests/harness.py)
        "PYLLM_EXPECT_PACKAGE_DIR": os.path.join(STAGE, "pyllm"),
        # Leaks: CPython and torch free at exit by design. ODR and the
        # allocator-mismatch check: torch's own libraries, not instrumented.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1:"
                        "detect_odr_violation=0:alloc_dealloc_mismatch=0:"
                        "detect_stack_use_after_return=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "TRITON_INTERPRET": "",  # the interpreter tests are not run here
    })
    check = ("import pyllm, pyllm._C as c; assert pyllm.__file__.startswith(%r), pyllm.__file__; "
             "print('sanitize: pyllm from', pyllm.__file__, 'ISA', c.cpu_isa())" % STAGE)
    canary(env)
    # Run from the stage: the first entry of sys.path is the working folder.
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=STAGE)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT,
              "-c", os.path.join(ROOT, "pyproject.toml")]
    if quick:
        # one process (each start under ASan costs seconds): per file its
        # selection, the file named by its module's node name
        expression = " or ".join(
            f"({os.path.basename(test)} and ({select}))" if select else f"({os.path.basename(test)})"
            for test, select in QUICK_TESTS.items())
        runs = [[*pytest, "-k", f"({expression}) and {DESELECT}",
                 *(os.path.join(ROOT, test) for test in QUICK_TESTS), *argv]]
    else:
        runs = [[*pytest, "-k", DESELECT, *(os.path.join(ROOT, t) for t in TESTS), *argv]]
    started = time.time()
    result = subprocess.CompletedProcess([], 0)
    for command in runs:
        result = subprocess.run(command, env=env, cwd=STAGE)
        if result.returncode != 0:
            break
    print(f"sanitize: pytest under ASan+UBSan finished with {result.returncode} in "
          f"{time.time() - started:.0f} s", flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
