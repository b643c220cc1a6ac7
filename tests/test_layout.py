"""The package's layout: data flows downhill through the layers, and every public module says what it exports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modeling_vitgpt2"

# Lowest first. A module may import from its own layer and the layers below it, never from one above: the model does
# not know about data, training does not publish, evaluation does not train. A new module gets a row here.
LAYERS = {
    "utilities": {"io_utils"},
    "model": {"configuration_vitgpt2", "modeling_vitgpt2", "processing_vitgpt2", "tokenization", "loading",
              "peft_setup", "quantization", "prepacking", "convert_vision_encoder_decoder"},
    "data": {"synthetic", "data", "feature_cache", "streaming"},
    "metrics": {"cider", "clip_score", "metrics"},
    "training": {"training"},
    "evaluation": {"evaluation", "zero_shot", "attention_maps"},
    "studies": {"study"},
    "publishing and apps": {"hub", "demo"},
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, at its top or inside functions alike."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                imported.add(node.module.split(".")[0])
            elif node.level == 1:
                imported.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("modeling_vitgpt2."):
                imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("modeling_vitgpt2."))
    return imported


def test_every_module_has_a_layer():
    unplaced = sorted({path.stem for path in modules()} - set(RANK))
    assert not unplaced, f"give {unplaced} a layer in LAYERS of {__file__}"


@pytest.mark.parametrize("path", modules(), ids=lambda path: path.stem)
def test_no_import_runs_back_up_the_layers(path):
    upward = {
        name: LAYER_OF[name] for name in package_imports(path) if name in RANK and RANK[name] > RANK[path.stem]
    }
    assert not upward, f"{path.stem} ({LAYER_OF[path.stem]} layer) imports from higher layers: {upward}"


def test_the_import_graph_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "example.py"
    module.write_text("def load():\n    from .training import run_training\n    from . import hub\n")
    assert package_imports(module) == {"training", "hub"}
@pytest.mark.parametrize("path", modules(), ids=lambda path: path.stem)
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
