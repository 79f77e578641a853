"""The build backend's choice of torch (build_backend.py): the supported
range, the probe of the target environment, and what an isolated build asks
for. The end-to-end proof (a plain `pip install` of the sdist into
environments with torch 2.11 ... 2.15 keeps that torch) is tools/torch_matrix.py."""

import sys

import pytest
import torch

from harness import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
import build_backend  # noqa: E402


@pytest.mark.parametrize("version, ok", [("2.10.2", False), ("2.11.0+cu130", True),
                                         ("2.13.0+cpu", True), ("2.15.1", True),
                                         ("2.16.0.dev20261201", False), ("3.0.0", False)])
def test_supported_range(version, ok):
    assert build_backend.is_supported(version) is ok


def test_requirement_string_matches_the_range():
    assert build_backend.SUPPORTED_TORCH_REQUIREMENT == "torch>=2.11,<2.16"


def test_the_probe_finds_this_interpreters_torch():
    found = build_backend._target_torch()
    assert found is not None and found["version"] == torch.__version__
    assert any(p and torch.__file__.startswith(p) for p in [found["site"]])


def test_the_probe_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PYLLM_BUILD_TORCH", "isolated")
    assert build_backend._target_torch() is None


def _hide_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError


def test_an_environment_without_torch_gets_torch_from_the_range(monkeypatch):
    _hide_torch(monkeypatch)
    monkeypatch.setattr(build_backend, "_target_torch", lambda: None)
    assert build_backend.get_requires_for_build_wheel() == ["torch>=2.11,<2.16"]


def test_an_unsupported_torch_stops_the_build_naming_both(monkeypatch):
    _hide_torch(monkeypatch)
    monkeypatch.setattr(build_backend, "_target_torch",
                        lambda: {"version": "2.9.1", "site": "/nowhere", "path": []})
    with pytest.raises(RuntimeError, match=r"supports torch 2\.11 to 2\.15.*has torch 2\.9\.1"):
        build_backend.get_requires_for_build_wheel()


def test_a_supported_torch_is_used_in_place(monkeypatch, tmp_path):
    _hide_torch(monkeypatch)
    monkeypatch.setattr(build_backend, "_target_torch",
                        lambda: {"version": "2.11.0+cu130", "site": str(tmp_path), "path": []})
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert build_backend._use_target_torch() is True
    assert sys.path[-1] == str(tmp_path)  # after the build environment's own folders


def _tarball(path, files, mtime):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            t.addfile(info, io.BytesIO(data))
    return str(path)


def test_matrix_keeps_a_prepared_install_only_of_the_same_sources(tmp_path):
    """tools/torch_matrix.py: two sdists of one tree (other archive times)
    share a fingerprint; a changed, added or renamed file does not."""
    sys.path.insert(0, str(REPO_ROOT) + "/tools")
    from torch_matrix import install_options, source_fingerprint

    files = {"pyllm-0.1.0/a.py": b"x = 1\n", "pyllm-0.1.0/csrc/b.cpp": b"int b;\n"}
    same = [source_fingerprint(_tarball(tmp_path / f"{i}.tar.gz", files, mtime))
            for i, mtime in enumerate((1, 2))]
    assert same[0] == same[1]
    for i, other in enumerate([{**files, "pyllm-0.1.0/a.py": b"x = 2\n"},
                               {**files, "pyllm-0.1.0/c.py": b""},
                               {"pyllm-0.1.0/a2.py" if "a.py" in k else k: v
                                for k, v in files.items()}]):
        assert source_fingerprint(_tarball(tmp_path / f"o{i}.tar.gz", other, 1)) != same[0]
    assert install_options("2.11", "9.0", True) != install_options("2.12", "9.0", False)
