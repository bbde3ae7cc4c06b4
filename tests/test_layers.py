"""The library's layers: no module of pipeline/ imports from a layer above its own, nor anything from preprocess/.

Every import statement of every module under pipeline/ (at the top or inside a function: a deferred import is an
arrow all the same) is read with `ast`, without importing anything, and resolved to the pipeline module it names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The layers, lowest first: a module may import from its own layer and the ones before it, never from a later one.
# A module belongs to the layer of the longest name listed that is it or contains it. Why this order:
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Process-wide machinery every layer may use: the package itself, logging, the recipe's types and its loader,
    # the YAML/JSON file reader, the fallback records, preemption and rank health (logs only), and the launch
    # preflight (config only; its hostfile parser is how --check counts the ranks a hostfile gives).
    ("foundation", ("pipeline", "pipeline.logs", "pipeline.config", "pipeline.mapping_file", "pipeline.fallbacks",
                    "pipeline.resilience", "pipeline.preflight")),
    # The shard format, readers, registry, tokenization, sampling and batches: no model, no training.
    ("data", ("pipeline.data",)),
    # The embedding model: backbone, pooling, packing, attention, kernels, LoRA, Matryoshka truncation - the
    # embedding math both the losses and the evaluation use.
    ("model", ("pipeline.model",)),
    # Retrieval evaluation: embeds with the model, searches, scores; training calls it, it never calls training.
    ("evaluation", ("pipeline.evaluation",)),
    # Losses, GradCache, the trainer loop, checkpoints, export and the --check plan.
    ("training", ("pipeline.training",)),
    # Command-line tools composing the layers below (they may use each other).
    ("entry points", ("pipeline.evaluate", "pipeline.merge", "pipeline.merge_search", "pipeline.gradcheck",
                      "pipeline.selftest", "pipeline.demo_report")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of `module` (a KeyError for a module no layer lists: place it when adding it)."""
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    if index is None:
        raise KeyError(f"{module}: in no layer of tests/test_layers.py LAYERS")
    return index


def is_module(name: str) -> bool:
    path = REPO / Path(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported(source: str, module: str, *, package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`, the text of `module` (`package`: an ``__init__``);
    ``from a import b`` gives a.b when a.b is a module, else a."""
    here = module.split(".") if package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from this package, `level - 1` packages up
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
                    for alias in node.names]
    return sorted(out)


def pipeline_modules() -> list[Path]:
    return sorted((REPO / "pipeline").rglob("*.py"))


def test_every_module_has_a_layer():
    for path in pipeline_modules():
        layer_of(module_name(path))


@pytest.mark.parametrize("path", pipeline_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_import_from_a_higher_layer(path):
    module = module_name(path)
    own = layer_of(module)
    arrows = []
    for line, target in imported(path.read_text(), module, package=path.name == "__init__.py"):
        where = f"{path.relative_to(REPO)}:{line}: {LAYERS[own][0]} imports {target}"
        if target.split(".")[0] == "preprocess":
            arrows.append(f"{where} (pipeline/ never imports preprocess/)")
        elif target.split(".")[0] == "pipeline" and layer_of(target) > own:
            arrows.append(f"{where} ({LAYERS[layer_of(target)][0]})")
    assert not arrows, "\n".join(arrows)


def test_deferred_and_relative_imports_are_resolved():
    source = ("from ..training import losses\nimport preprocess.build\n\n\ndef f():\n"
              "    from pipeline.training.gradcache import train_step\n")
    assert imported(source, "pipeline.model.embedding") == [
        (1, "pipeline.training.losses"), (2, "preprocess.build"), (6, "pipeline.training.gradcache")]
    assert layer_of("pipeline.training.losses") > layer_of("pipeline.model.embedding")
