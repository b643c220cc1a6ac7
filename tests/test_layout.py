"""The package's layout: data flows downhill through the layers, and every public module says what it exports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_vitgpt2"

# Lowest first: one subpackage a layer. A module may import from its own layer and the layers below it, never from
# one above: the model does not know about data, inference does not train, evaluation does not train, training does
# not publish. docs/architecture.md draws these; a new subpackage gets a row in both.
LAYERS = ("utils", "model", "data", "inference", "evaluation", "training", "applications", "cli")
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
# The model unit is copied into every saved folder for `trust_remote_code=True`: it may import only its own files.
MODEL_UNIT = {"configuration_vitgpt2", "modeling_vitgpt2", "processing_vitgpt2"}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.stem != "__init__" and "__pycache__" not in path.parts)


def layer_of(path: Path) -> str:
    """`model` for modeling_vitgpt2/model/modeling_vitgpt2.py, `cli` for modeling_vitgpt2/cli.py."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def package_imports(path: Path, source: str | None = None) -> set[tuple[str, ...]]:
    """The package modules `path` (or `source` placed there) imports, at its top or inside functions alike, as dotted
    parts below the package: `("data", "captions")`."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]  # the subpackage path holds
    imported = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                parts = base + tuple(node.module.split(".")) if node.module else base
                if node.module:
                    imported.add(parts)
                else:
                    imported.update(parts + (alias.name,) for alias in node.names)
            elif node.module and node.module.split(".")[0] == "modeling_vitgpt2":
                parts = tuple(node.module.split(".")[1:])
                imported.update({parts} if parts else {(alias.name,) for alias in node.names})
        elif isinstance(node, ast.Import):
            imported.update(tuple(alias.name.split(".")[1:]) for alias in node.names
                            if alias.name.startswith("modeling_vitgpt2."))
    return {parts for parts in imported if parts}


def test_every_module_is_in_a_layer():
    unplaced = sorted(str(path.relative_to(PACKAGE)) for path in modules() if layer_of(path) not in RANK)
    assert not unplaced, f"put {unplaced} in a subpackage named in LAYERS of {__file__}"


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_import_runs_back_up_the_layers(path):
    own = layer_of(path)
    upward = sorted(".".join(parts) for parts in package_imports(path)
                    if parts[0] in RANK and RANK[parts[0]] > RANK[own])
    assert not upward, f"{path.relative_to(PACKAGE)} ({own} layer) imports from higher layers: {upward}"


@pytest.mark.parametrize("name", sorted(MODEL_UNIT))
def test_the_model_unit_imports_only_its_own_files(name):
    path = PACKAGE / "model" / f"{name}.py"
    outside = sorted(".".join(parts) for parts in package_imports(path) if parts[:2] not in {("model", unit) for unit in MODEL_UNIT})
    assert not outside, f"{path.name} is copied into saved folders for remote code; it must not import {outside}"


def test_the_import_graph_checker_sees_function_level_and_relative_imports():
    source = ("def load():\n    from ..training.run import run_training\n    from ..applications import hub\n"
              "    from .captions import CaptionCollator\n    import modeling_vitgpt2.inference.loading\n")
    found = package_imports(PACKAGE / "data" / "example.py", source)
    assert found == {("training", "run"), ("applications",), ("data", "captions"), ("inference", "loading")}


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_every_public_module_declares_all_after_its_imports(path):
    tree = ast.parse(path.read_text())
    assignments = [
        index for index, node in enumerate(tree.body)
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets)
    ]
    assert len(assignments) == 1, f"{path.name} needs one `__all__`"
    (position,) = assignments
    last_import = max(index for index, node in enumerate(tree.body) if isinstance(node, (ast.Import, ast.ImportFrom)))
    assert position == last_import + 1, f"{path.name}: put `__all__` right after the imports"
    exported = ast.literal_eval(tree.body[position].value)
    defined = {
        getattr(node, "name", None) for node in tree.body
    } | {
        target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target]) if hasattr(target, "id")
    } | {
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert set(exported) <= defined, f"{path.name} exports undefined names {sorted(set(exported) - defined)}"
