"""Writes tests/constraints.txt: the exact release of every package the tests install, read from the environment
they just passed in.

pip-tools or `uv pip compile` would resolve the ranges again from the registry; freezing the tested environment
pins what was really tested, torch from the local package cache included. The CUDA wheels torch pulls in are left
out: torch's own pin fixes them, and they differ by platform. How to refresh: docs/development.md.

    python tests/freeze_constraints.py > tests/constraints.txt
"""

import importlib.metadata
import re
import sys

from packaging.requirements import Requirement

PROJECT = "modeling-vitgpt2"
EXTRAS = ("test", "demo")
PLATFORM_BUILDS = re.compile(r"^(nvidia-|cuda-|triton$)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_closure(project: str, extras: tuple[str, ...]) -> dict[str, str]:
    """{package: installed version} for everything `project[extras]` needs, transitively."""
    versions: dict[str, str] = {}
    pending = [(project, extras)]
    while pending:
        name, wanted_extras = pending.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = canonical(name)
        if key in versions and not wanted_extras:
            continue
        versions[key] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            markers = [{"extra": extra} for extra in ("", *wanted_extras)]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in markers):
                pending.append((requirement.name, tuple(requirement.extras)))
    versions.pop(canonical(project), None)
    return versions


def main() -> None:
    versions = installed_closure(PROJECT, EXTRAS)
    python = ".".join(map(str, sys.version_info[:2]))
    print(f"# The test environment, pinned: every package `{PROJECT}[{','.join(EXTRAS)}]` installs, at the release the")
    print(f"# whole suite passed with (Python {python}). Written by tests/freeze_constraints.py; tests/ci.sh installs")
    print("# with `pip install -c tests/constraints.txt`. Users are not pinned: pyproject.toml keeps ranges.")
    for name, version in sorted(versions.items()):
        if not PLATFORM_BUILDS.match(name):
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
