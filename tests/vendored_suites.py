"""Imports the third-party test suites in `../shared/vendor/` under package names of their own.

transformers' and peft's test folders are both Python packages named `tests`, like this project's folder, so they
cannot all be on `sys.path` as `tests`. Each is loaded here as its own package (`transformers_suites`,
`peft_suites`) straight from the vendor folder, never copied; test modules that use them skip when it is absent.

The suite files are one exact release of each library (their README names it) and break on others (transformers
5.25 removed helpers the 5.24 files import). `version_mismatches` compares the installed releases with those:
conftest.py leaves the suites' test modules out of collection on a mismatch, and
tests/test_vendored_suites.py fails with one message naming both versions instead of an import traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

VENDOR = Path(__file__).resolve().parents[1].parent / "shared" / "vendor"

# library -> (its vendored folder, the test modules of ours that import that folder's suites)
VENDORED = {
    "transformers": ("transformers-tests", "test_transformers_common.py"),
    "peft": ("peft-tests", "test_peft_common.py"),
}


def vendored_version(folder: Path) -> str:
    """The release a vendored folder's files come from: the first bold version in its README (`**5.24.0**`)."""
    readme = folder / "README.md"
    match = re.search(r"\*\*(\d+(?:\.\d+)+)\*\*", readme.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{readme}: no release named as **X.Y.Z**; say which release the suite files come from")
    return match.group(1)


def version_mismatches(vendor: Path = VENDOR, installed: dict[str, str] | None = None) -> dict[str, str]:
    """{test module: why its vendored suites cannot run} for every present vendored folder whose release differs
    from the installed library's; `installed` overrides what importlib.metadata reports (for testing the check)."""
    mismatches = {}
    for library, (folder_name, test_module) in VENDORED.items():
        folder = vendor / folder_name
        if not (folder / "README.md").is_file():
            continue
        wanted = vendored_version(folder)
        have = (installed or {}).get(library) or importlib.metadata.version(library)
        if have != wanted:
            mismatches[test_module] = (
                f"{library} {have} is installed, but the vendored suites in {folder} are {library} {wanted}'s: "
                f"install the pinned test environment (pip install -c tests/constraints.txt -e \".[test]\"), "
                f"or refresh the vendored files to {library} {have}'s"
            )
    return mismatches


def _load_package(alias: str, root: Path) -> types.ModuleType:
    if alias in sys.modules:
        return sys.modules[alias]
    init = root / "__init__.py"
    if not init.is_file():
        pytest.skip(f"third-party test suites not found at {root}", allow_module_level=True)
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    return package


def transformers_suites() -> types.SimpleNamespace:
    """transformers 5.24's `ModelTesterMixin`, `GenerationTesterMixin` and `ConfigTester`."""
    pytest.importorskip("parameterized", reason="transformers' test suites need `parameterized` (the `test` extra)")
    from transformers import testing_utils

    alias = "transformers_suites"
    # `@slow` reads this flag when the suites are imported. Their slow-marked tests that run on a CPU (eager vs SDPA
    # generate, static cache, torch.compile, torch.export) take about a minute at the testers' tiny sizes, so they
    # run here by default; RUN_SLOW=0 leaves them out.
    run_slow = testing_utils._run_slow_tests
    testing_utils._run_slow_tests = testing_utils.parse_flag_from_env("RUN_SLOW", default=True)
    try:
        package = _load_package(alias, VENDOR / "transformers-tests" / "tests")
        export = importlib.import_module(f"{alias}.exporters.test_export")
        # generation/test_utils.py imports `tests.exporters.test_export` by its absolute name: let that one import
        # resolve to the copy loaded above, then put back whatever `tests` meant before.
        borrowed = {
            "tests": package,
            "tests.exporters": sys.modules[f"{alias}.exporters"],
            "tests.exporters.test_export": export,
        }
        saved = {name: sys.modules.get(name) for name in borrowed}
        sys.modules.update(borrowed)
        try:
            generation = importlib.import_module(f"{alias}.generation.test_utils")
            modeling = importlib.import_module(f"{alias}.test_modeling_common")
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        configuration = importlib.import_module(f"{alias}.test_configuration_common")
    finally:
        testing_utils._run_slow_tests = run_slow
    _bridge_export_api()
    return types.SimpleNamespace(
        ModelTesterMixin=modeling.ModelTesterMixin,
        GenerationTesterMixin=generation.GenerationTesterMixin,
        ConfigTester=configuration.ConfigTester,
        floats_tensor=modeling.floats_tensor,
        ids_tensor=modeling.ids_tensor,
        random_attention_mask=modeling.random_attention_mask,
        modeling=modeling,
        generation=generation,
    )


def _bridge_export_api() -> None:
    """The vendored export tests (upstream 5.16.0.dev0, see the vendor README) call `.module()` on what
    `DynamoExporter.export` returns; transformers 5.24 returns an `ExportedModel` whose graph is `.program`. This
    gives it the old accessor, so those tests run (rather than fail for every model) against 5.24."""
    from transformers.exporters.base import ExportedModel

    if not hasattr(ExportedModel, "module"):
        ExportedModel.module = lambda exported: exported.program.module()


def peft_suites() -> types.SimpleNamespace:
    """peft 0.21.2's `PeftCommonTester`."""
    if importlib.util.find_spec("diffusers") is None:
        # testing_common.py imports diffusers at module level for its Stable Diffusion helpers only, which these
        # tests never call: a stand-in module keeps that import from failing without installing diffusers.
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules.setdefault("diffusers", stub)
    alias = "peft_suites"
    _load_package(alias, VENDOR / "peft-tests" / "tests")
    common = importlib.import_module(f"{alias}.testing_common")
    return types.SimpleNamespace(PeftCommonTester=common.PeftCommonTester, testing_common=common)
