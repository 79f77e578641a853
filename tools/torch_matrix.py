"""The torch-range proof: pyllm built and tested against every supported torch.

For each torch minor release (2.11 ... 2.15) it makes a fresh virtual
environment with that torch (the CUDA build that PyPI serves, with the Triton
it pins) and the test tools, installs pyllm from an sdist of this tree the way
a user would, with a plain ``pip install pyllm-<ver>.tar.gz`` (isolated build,
no flags: the build backend compiles against the torch already installed),
checks that the torch was kept and that the wheel names it, and runs the op
tests, the installed-package checks and the Triton compile and interpreter
tests from a scratch folder against the installed package. For the release
that GPU machines carry (GPU_MACHINE_RELEASE) it also runs the GPU acceptance
command's dry run (tools/gpu_check.py --dry-run) in an unpacked copy of the
sdist.

    python tools/torch_matrix.py                 # every release
    python tools/torch_matrix.py --ci 2.11       # what CI (`make test`) runs
    python tools/torch_matrix.py --prepare 2.11  # only the environment, ahead

--prepare makes a release's environment (venv, torch, test tools) ahead of
the check, in WORKDIR/prepared/<release>/, and installs an sdist of the tree
into it as the check would (with --ci, the check's options): `make test`
starts it in the background before the suite, at the lowest priority, so
the ~2.8 GB download and the extension's compile take the cores the suite
leaves idle. A later check of that release takes the prepared environment
if it is complete (and makes its own if not), uses it once and deletes it;
it keeps the prepared install only when the sdist it installed holds the
same files as the check's own sdist (source_fingerprint) and was built with
the same options, and installs its sdist otherwise. A lock file per release
keeps the two from working on one environment at once.

--ci keeps CI under its time budget: no GPU acceptance dry run and no CUDA
build in the matrix (the main suite builds CUDA and runs a dry run under the
development torch), and the op tests without the per-ISA subprocess runs
(pyllm's own CPU dispatch, the same under every torch; the main suite runs
them), with the Triton AOT compiles for sm_90 only (the main suite
compiles for sm_80 too) and without the Triton interpreter's run (the
kernels' semantics, run by the main suite; the release's Triton still
compiles every kernel here). CI checks the oldest release, the GPU machines'
(2.11); `make matrix` checks all five in full.

pip on some machines is configured to cap torch; the environments here read
no pip configuration file (PIP_CONFIG_FILE=/dev/null), ignore the caller's
PIP_CONSTRAINT and PIP_FIND_LINKS, and fetch from PyPI (or PIP_INDEX_URL).
The machine's own configuration is never touched.

Each release runs in WORKDIR/<release>/ (deleted after a pass unless
--keep); a summary table and WORKDIR/matrix.json say what passed, how long
each step took and how much was downloaded. The last line is
"N passed, N failed".
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

#: torch release -> (exact version, Python it is tested with, extra pins of
#: the test environment). The Pythons cover 3.10-3.12 (torch 2.15 needs 3.11
#: or newer); 2.11 with 3.12 is what GPU machines carry. Triton 3.6's
#: interpreter turns one-element arrays into Python ints, an error since
#: NumPy 2.4: its environment keeps NumPy below that.
RELEASES = {
    "2.11": ("2.11.0", "3.12", ["numpy<2.4"]),
    "2.12": ("2.12.1", "3.10", []),
    "2.13": ("2.13.0", "3.11", []),
    "2.14": ("2.14.1", "3.11", []),
    "2.15": ("2.15.0", "3.11", []),
}
GPU_MACHINE_RELEASE = "2.11"
#: What a test environment needs besides torch (ranges: constraints.txt's
#: hypothesis needs Python 3.11).
TEST_TOOLS = ["pytest>=8,<10", "pytest-xdist>=3,<4", "hypothesis>=6.100,<7"]
#: Run against the installed package, from a folder outside the source tree.
OP_TESTS = ["test_installed.py", "test_norms.py", "test_linear.py", "test_attention.py",
            "test_triton_compile.py", "test_triton_ptx.py", "test_triton_interpreter.py"]
#: What --ci leaves out of OP_TESTS (see the docstring).
CI_LEAVES_OUT = {"test_triton_interpreter.py"}


def find_python(version: str) -> str | None:
    """An interpreter of this Python version: python3.X on PATH, else pyenv's."""
    candidates = [shutil.which(f"python{version}")]
    if shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin",
                                                    f"python{version}")), reverse=True)
    for path in filter(None, candidates):
        probe = subprocess.run([path, "-c", "import sys, venv; print(sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == str(tuple(map(int, version.split(".")))):
            return path
    return None


def pip_env() -> dict:
    """The environment for pip: no configuration file, no caller constraint or
    extra wheel folder."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PYTHONPATH",
                        "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def received_bytes() -> int:
    """Bytes received on every network interface but loopback (Linux)."""
    try:
        with open("/proc/net/dev") as f:
            lines = f.readlines()[2:]
    except OSError:
        return 0
    total = 0
    for line in lines:
        name, data = line.split(":", 1)
        if name.strip() != "lo":
            total += int(data.split()[0])
    return total


def print_step(record: dict) -> None:
    print(f"  {record['step']:<28} {record['seconds']:7.1f} s  {record['downloaded_mb']:8.1f} MB  "
          f"{'ok' if record['ok'] else 'FAILED'}", flush=True)


class Step:
    """Runs commands for one release, logging them and timing each step."""

    def __init__(self, folder: str):
        self.folder = folder
        self.log = open(os.path.join(folder, "log.txt"), "a")
        self.steps = []

    def run(self, name, cmd, env=None, cwd=None, timeout=3600):
        start, rx = time.time(), received_bytes()
        self.log.write(f"\n$ {' '.join(map(str, cmd))}\n")
        self.log.flush()
        result = subprocess.run([str(c) for c in cmd], env=env or pip_env(), cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout)
        self.log.write(result.stdout)
        self.log.flush()
        record = {"step": name, "seconds": round(time.time() - start, 1),
                  "downloaded_mb": round((received_bytes() - rx) / 1e6, 1),
                  "ok": result.returncode == 0}
        self.steps.append(record)
        print_step(record)
        if result.returncode != 0:
            tail = "\n".join(result.stdout.strip().splitlines()[-40:])
            raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{tail}")
        return result.stdout


@contextlib.contextmanager
def release_lock(workdir: str, release: str):
    """Held while a release's prepared environment is made or taken."""
    os.makedirs(os.path.join(workdir, "prepared"), exist_ok=True)
    with open(os.path.join(workdir, "prepared", f"{release}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_environment(step: "Step", release: str, venv: str) -> str:
    """A fresh venv at `venv` with the release's torch and the test tools;
    returns its python."""
    version, python_version, pins = RELEASES[release]
    interpreter = find_python(python_version)
    if interpreter is None:
        raise RuntimeError(f"no Python {python_version} interpreter found "
                           f"(python{python_version} on PATH or a pyenv version)")
    python = os.path.join(venv, "bin", "python")
    step.run("venv", [interpreter, "-m", "venv", venv])
    step.run("install torch + tools", [python, "-m", "pip", "install", "-q",
                                       f"torch=={version}", *TEST_TOOLS, *pins])
    return python


def ready_record(folder: str, release: str):
    """A prepared environment's ready mark ({"torch", "steps"}), or None where
    it is incomplete or was made for another torch version."""
    try:
        with open(os.path.join(folder, "ready.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("torch") == RELEASES[release][0] else None


def source_fingerprint(sdist: str) -> str:
    """A hash of the sdist's files (names and contents; not the archive's
    times), so that two sdists of one tree compare equal."""
    import hashlib

    digest = hashlib.sha256()
    with tarfile.open(sdist) as t:
        for member in sorted((m for m in t.getmembers() if m.isfile()), key=lambda m: m.name):
            digest.update(member.name.encode() + b"\0")
            digest.update(t.extractfile(member).read())
    return digest.hexdigest()


def install_options(release: str, archs: str, ci: bool) -> dict:
    """The build options of the check's sdist install (recorded with a prepared one)."""
    # no CUDA build: 2.11's is the GPU check's (check_release), --ci's the main suite's
    return {"archs": archs, "skip_cuda": release == GPU_MACHINE_RELEASE or ci}


def install_env(options: dict) -> dict:
    env = {**pip_env(), "TORCH_CUDA_ARCH_LIST": options["archs"]}
    if options["skip_cuda"]:  # the CUDA build is the GPU check's, or the main suite's
        env["PYLLM_SKIP_CUDA"] = "1"
    return env


def install_sdist(step: "Step", python: str, sdist: str, options: dict) -> None:
    """The documented install: plain pip, isolated build, no flags."""
    step.run("pip install sdist", [python, "-m", "pip", "install", "--no-cache-dir", sdist],
             env=install_env(options))


def prepare_release(release: str, workdir: str, archs: str = "9.0", ci: bool = False) -> bool:
    """--prepare: the release's environment in WORKDIR/prepared/<release>/
    with an sdist of the tree installed, marked ready.json (its steps, the
    sdist's fingerprint and the install's options) once complete."""
    folder = os.path.join(workdir, "prepared", release)
    with release_lock(workdir, release):
        if ready_record(folder, release) is not None:
            print(f"torch {release}: prepared environment already in {folder}", flush=True)
            return True
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        step = Step(folder)
        print(f"torch {release}: preparing the environment in {folder}", flush=True)
        options = install_options(release, archs, ci)
        try:
            python = make_environment(step, release, os.path.join(folder, "venv"))
            sdist = make_sdist(folder)
            install_sdist(step, python, sdist, options)
        except Exception as e:  # noqa: BLE001 - the check then makes its own
            print(f"  FAILED: {e}", flush=True)
            return False
        finally:
            step.log.close()
        with open(os.path.join(folder, "ready.json"), "w") as f:
            json.dump({"torch": RELEASES[release][0], "steps": step.steps,
                       "installed": {"fingerprint": source_fingerprint(sdist), **options}}, f)
    return True


def take_prepared(workdir: str, release: str):
    """The prepared environment's venv, steps and install record (the sdist's
    fingerprint and options), taken for one check (its ready mark removed),
    or None where there is none complete."""
    folder = os.path.join(workdir, "prepared", release)
    with release_lock(workdir, release):
        record = ready_record(folder, release)
        if record is None:
            return None
        os.remove(os.path.join(folder, "ready.json"))
    steps = record["steps"]
    for s in steps:
        s["step"] += " (prepared)"
    return os.path.join(folder, "venv"), steps, record.get("installed")


def make_sdist(workdir: str) -> str:
    """An sdist of the tree in WORKDIR/sdist/, built from a copy of the
    sources: the build rewrites ``pyllm.egg-info`` in the folder it builds,
    and in the tree that one is the editable install's metadata (its version
    without the local part would shadow the installed one, while the suite
    runs beside --prepare and after a check). A file the copy missed would
    change the sdist's fingerprint, and a check then installs its own."""
    out = os.path.join(workdir, "sdist")
    shutil.rmtree(out, ignore_errors=True)
    source = os.path.join(workdir, "source")
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "bench-results", "*.egg-info", "__pycache__", "*.so"))
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out,
                    source], check=True, capture_output=True, text=True)
    shutil.rmtree(source, ignore_errors=True)
    (sdist,) = glob.glob(os.path.join(out, "pyllm-*.tar.gz"))
    return sdist


def torch_of(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, env=pip_env()).stdout.strip()


def check_release(release: str, sdist: str, workdir: str, archs: str, keep: bool,
                  ci: bool = False) -> dict:
    version, python_version, _ = RELEASES[release]
    folder = os.path.join(workdir, release)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    result = {"release": release, "torch": version, "python": python_version, "ok": False}
    step = Step(folder)
    result["steps"] = step.steps
    print(f"torch {version} (Python {python_version}) in {folder}", flush=True)
    prepared = take_prepared(workdir, release)
    options = install_options(release, archs, ci)
    try:
        installed = None
        if prepared is not None:
            venv, steps, installed = prepared
            step.steps.extend(steps)
            python = os.path.join(venv, "bin", "python")
            print(f"  (the environment prepared in {os.path.dirname(venv)})", flush=True)
            for record in steps:
                print_step(record)
        else:
            venv = os.path.join(folder, "venv")
            python = make_environment(step, release, venv)
        # (the prepared environment's pip install of its own sdist counts
        # when that sdist holds this one's files, built the same way)
        same = installed == {"fingerprint": source_fingerprint(sdist), **options}
        if prepared is not None and installed is not None and not same:
            print("  (the prepared install is of other sources or options: installing again)",
                  flush=True)
        installed_torch = RELEASES[release][0] if same else torch_of(python)
        result["torch_installed"] = installed_torch
        gpu_machine = release == GPU_MACHINE_RELEASE and not ci
        if not same:
            install_sdist(step, python, sdist, options)
        if torch_of(python).split("+")[0] != installed_torch.split("+")[0]:
            raise RuntimeError(f"installing pyllm replaced torch {installed_torch} with "
                               f"{torch_of(python)}")
        pyllm_version = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('pyllm'))"],
            capture_output=True, text=True, env=pip_env(), cwd=folder).stdout.strip()
        result["pyllm"] = pyllm_version
        if not pyllm_version.endswith(f"torch{release}"):
            raise RuntimeError(f"pyllm {pyllm_version} does not name torch {release}")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], capture_output=True, text=True).stdout.strip()
        work = os.path.join(folder, "work")
        os.makedirs(work)
        test_env = {**pip_env(), "PYLLM_EXPECT_PACKAGE_DIR": os.path.join(site, "pyllm"),
                    # the main run has these (slow in the interpreter)
                    "PYLLM_INTERPRETER_DESELECT": "properties or nonfinite"}
        select = ["-k", "not every_cpu_isa_path and not -80]"] if ci else []
        tests = [t for t in OP_TESTS if not (ci and t in CI_LEAVES_OUT)]
        # One process per core (pytest-xdist): the Triton compiles are
        # single-threaded. Not with the interpreter's tests: each process
        # would start its own background interpreter run.
        parallel = [] if "test_triton_interpreter.py" in tests else ["-n", "auto"]
        out = step.run("op tests (installed)", [python, "-m", "pytest", "-q", "-p",
                                                "no:cacheprovider", *parallel, *select,
                                                *(os.path.join(TESTS, t) for t in tests)],
                       env=test_env, cwd=work)
        result["op_tests"] = out.strip().splitlines()[-1]
        if gpu_machine:
            # The GPU acceptance command, as a GPU machine would run it, in a
            # copy of the source: its own build (editable, no isolation) for
            # sm_90, then everything but what needs the device.
            with tarfile.open(sdist) as t:
                t.extractall(folder)
            source = glob.glob(os.path.join(folder, "pyllm-*/"))[0]
            report = os.path.join(folder, "gpu-check")
            # --budget 900: the build's share must hold a 2-core build of every
            # CUDA source (the GPU machine's 16 cores keep the default 480 s)
            step.run("gpu_check --dry-run", [python, os.path.join(source, "tools", "gpu_check.py"),
                                             "--dry-run", "--arch", "9.0", "--budget", "900",
                                             "--out", report],
                     env=pip_env(), cwd=source)
            result["gpu_check_dry_run"] = report
            with open(os.path.join(report, "report.json")) as f:
                built = json.load(f).get("build_record", {}).get("pyllm_version", "?")
            result["pyllm"] += f", {built} (gpu_check)"
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported, then the next release
        result["error"] = str(e)
        print(f"  FAILED: {e}", flush=True)
    finally:
        step.log.close()
    if prepared is not None and not keep:  # used once
        shutil.rmtree(os.path.dirname(prepared[0]), ignore_errors=True)
    if result["ok"] and not keep:
        shutil.rmtree(os.path.join(folder, "venv"), ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="*", default=list(RELEASES),
                        help=f"torch releases to check (default: {' '.join(RELEASES)})")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "build", "matrix"))
    parser.add_argument("--archs", default="9.0",
                        help="TORCH_CUDA_ARCH_LIST of the CUDA builds (default 9.0: one arch "
                             "proves the build at half the compile time)")
    parser.add_argument("--keep", action="store_true", help="keep the environments")
    parser.add_argument("--prepare", action="store_true",
                        help="only make the releases' environments (venv, torch, test tools) "
                             "for a later check to take")
    parser.add_argument("--ci", action="store_true",
                        help="CI's shorter run: no GPU dry run or CUDA build, no per-ISA "
                             "subprocess tests, Triton compiles for sm_90 only")
    args = parser.parse_args(argv)
    unknown = [r for r in args.releases if r not in RELEASES]
    if unknown:
        parser.error(f"unknown torch release(s) {unknown}; supported: {list(RELEASES)}")
    os.makedirs(args.workdir, exist_ok=True)
    if args.prepare:
        return 0 if all([prepare_release(r, args.workdir, args.archs, args.ci)
                         for r in args.releases]) else 1
    start = time.time()
    sdist = make_sdist(args.workdir)
    print(f"sdist: {sdist}", flush=True)
    results = [check_release(r, sdist, args.workdir, args.archs, args.keep, args.ci)
               for r in args.releases]
    with open(os.path.join(args.workdir, "matrix.json"), "w") as f:
        json.dump({"seconds": round(time.time() - start), "results": results}, f, indent=1)
    print(f"\n{'torch':<8}{'python':<8}{'pyllm':<28}{'minutes':>8}{'MB down':>9}  result")
    # (on 2.11 the plain install is CPU-only, the GPU check's build has CUDA)
    for r in results:
        minutes = sum(s["seconds"] for s in r["steps"]) / 60
        down = sum(s["downloaded_mb"] for s in r["steps"])
        outcome = r.get("op_tests", "") if r["ok"] else "FAILED: " + r.get("error", "")[:60]
        print(f"{r['torch']:<8}{r['python']:<8}{r.get('pyllm', '-'):<28}{minutes:8.1f}"
              f"{down:9.0f}  {outcome}")
    passed = sum(r["ok"] for r in results)
    print(f"\n{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
