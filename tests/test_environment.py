"""The conda environment.yml must install exactly the runtime dependencies of pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_deps() -> dict[str, str]:
    data = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    return {_name(r): r.replace(" ", "") for r in data["project"]["dependencies"]}


def _environment_pip() -> tuple[dict[str, str], list[str]]:
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = {}
    other = []
    for entry in pip_section:
        if entry.startswith("-"):
            other.append(entry)
        else:
            reqs[_name(entry)] = entry.replace(" ", "")
    return reqs, other


def test_environment_matches_pyproject():
    pyproject = _pyproject_deps()
    env, _ = _environment_pip()
    missing = sorted(set(pyproject) - set(env))
    extra = sorted(set(env) - set(pyproject))
    assert not missing and not extra, f"environment.yml drifted: missing {missing}, extra {extra}"
    differing = {k: (pyproject[k], env[k]) for k in pyproject if pyproject[k] != env[k]}
    assert not differing, f"version specifiers differ (pyproject, environment.yml): {differing}"


def test_environment_installs_the_project_and_python_311():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    _, other = _environment_pip()
    assert "-e ." in other


def test_torch_requirement_is_a_range_the_cpu_build_satisfies():
    # `make` installs torch==2.13.0 first; the project must not force another build over it.
    torch_req = _pyproject_deps()["torch"]
    assert "==" not in torch_req, torch_req


def _locked() -> dict[str, str]:
    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", p) for p in pins), (
        "constraints.txt: name==version lines only"
    )
    return {_name(p): p.split("==")[1] for p in pins}


def test_the_lock_satisfies_pyproject_and_leaves_torch_to_the_user():
    """``make`` installs with ``-c constraints.txt``: every locked runtime dependency must be inside
    pyproject's range (else pip fails on a fresh machine), and torch must stay unlocked."""
    from packaging.specifiers import SpecifierSet

    locked = _locked()
    assert "torch" not in locked
    for name, requirement in _pyproject_deps().items():
        if name == "torch":
            continue
        assert name in locked, f"{name} is a dependency but not locked in constraints.txt"
        spec = SpecifierSet(requirement[len(name) :].split(";")[0])
        assert spec.contains(locked[name], prereleases=True), (
            f"locked {name}=={locked[name]} violates {requirement}"
        )
    assert "-c constraints.txt" in (PROJECT_ROOT / "Makefile").read_text()


def test_environment_installs_at_the_locked_versions():
    """conda hands the pip lines to pip as a requirements file written beside environment.yml, so a
    relative ``-c constraints.txt`` there is the repository's lock. It must come before the
    requirements, and every requirement but torch must be locked inside its range."""
    from packaging.specifiers import SpecifierSet

    reqs, other = _environment_pip()
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip_section[0] == "-c constraints.txt", (
        f"environment.yml pip section must start with the lock: {pip_section[:2]}"
    )
    assert (PROJECT_ROOT / "constraints.txt").is_file()
    locked = _locked()
    for name, requirement in reqs.items():
        if name == "torch":
            continue
        assert name in locked, f"environment.yml installs {name}, which constraints.txt does not lock"
        spec = SpecifierSet(requirement[len(name) :].split(";")[0])
        assert spec.contains(locked[name], prereleases=True), (
            f"locked {name}=={locked[name]} violates {requirement}"
        )
