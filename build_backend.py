"""The PEP 517 build backend of pyllm: setuptools', built against the torch of
the environment being installed into.

pyllm's extensions link against one torch minor release, so they must be
compiled against the torch they will run with. An isolated build (plain
``pip install pyllm-<ver>.tar.gz``, ``pip install .``) would otherwise install
the newest torch of the supported range into a throw-away build environment,
compile against it, and then require it: a cluster's pinned torch would be
replaced.

So before the build, this backend asks the target environment's interpreter
(``sys.executable`` under pip, with the build environment's ``PYTHONPATH``
removed) which torch it has:

- a supported torch (``SUPPORTED_TORCH``): the build uses that very
  installation (its site folders are appended to ``sys.path``, after the build
  environment's own), downloads no torch, and the wheel requires that minor
  release;
- a torch outside the range: the build stops with an error naming both;
- no torch (``python -m build``, a fresh environment): torch from the range
  is a build requirement like any other, and the wheel requires the minor
  release pip chose.

``PYLLM_BUILD_TORCH=isolated`` skips the probe (torch from the range, always).
``pip install --no-build-isolation`` bypasses all of this, as before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from setuptools import build_meta as _setuptools

#: The torch minor releases pyllm builds and runs against, both ends included.
SUPPORTED_TORCH = ((2, 11), (2, 15))
#: The same range as a requirement string.
SUPPORTED_TORCH_REQUIREMENT = (f"torch>={SUPPORTED_TORCH[0][0]}.{SUPPORTED_TORCH[0][1]},"
                               f"<{SUPPORTED_TORCH[1][0]}.{SUPPORTED_TORCH[1][1] + 1}")

_PROBE = ("import json, os, sys\n"
          "try:\n"
          "    import torch\n"
          "except ImportError:\n"
          "    print(json.dumps(None)); sys.exit()\n"
          "print(json.dumps({'version': torch.__version__, 'path': sys.path,\n"
          "                  'site': os.path.dirname(os.path.dirname(torch.__file__))}))\n")


def torch_release(version: str) -> tuple[int, int]:
    """'2.11.0+cu130' -> (2, 11)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def is_supported(version: str) -> bool:
    """Whether pyllm supports this torch version (by minor release)."""
    return SUPPORTED_TORCH[0] <= torch_release(version) <= SUPPORTED_TORCH[1]


def _target_torch():
    """The torch of the environment being installed into, or None."""
    if os.environ.get("PYLLM_BUILD_TORCH", "").strip().lower() == "isolated":
        return None
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=300, cwd=os.path.expanduser("~"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _use_target_torch() -> bool:
    """Appends the target environment's site folders to sys.path when it has a
    supported torch (True); raises when it has an unsupported one."""
    try:
        import torch  # already importable (a non-isolated build): nothing to do
        del torch
        return True
    except ImportError:
        pass
    found = _target_torch()
    if found is None:
        return False
    if not is_supported(found["version"]):
        low, high = SUPPORTED_TORCH
        raise RuntimeError(
            f"pyllm supports torch {low[0]}.{low[1]} to {high[0]}.{high[1]}; the environment "
            f"being installed into ({sys.executable}) has torch {found['version']}. Install a "
            f"supported torch first, e.g. pip install 'torch=={high[0]}.{high[1]}.*'.")
    for path in [found["site"], *found["path"]]:
        if path and os.path.isdir(path) and path not in sys.path:
            sys.path.append(path)
    print(f"pyllm: building against the installed torch {found['version']} ({found['site']})",
          file=sys.stderr)
    return True


def _get_requires(setuptools_hook, config_settings):
    # setuptools' hook runs setup.py, which imports torch: only once it is found.
    if _use_target_torch():
        return setuptools_hook(config_settings)
    return [SUPPORTED_TORCH_REQUIREMENT]


def get_requires_for_build_wheel(config_settings=None):
    return _get_requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _get_requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    return _get_requires(_setuptools.get_requires_for_build_sdist, config_settings)


def _prepared(hook):
    def run(*args, **kwargs):
        _use_target_torch()
        return hook(*args, **kwargs)
    run.__name__ = hook.__name__
    return run


build_wheel = _prepared(_setuptools.build_wheel)
build_editable = _prepared(_setuptools.build_editable)
build_sdist = _prepared(_setuptools.build_sdist)
prepare_metadata_for_build_wheel = _prepared(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _prepared(_setuptools.prepare_metadata_for_build_editable)
