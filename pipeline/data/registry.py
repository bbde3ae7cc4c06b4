"""Dataset registry: YAML mapping each dataset name to its type and query instruction.

Format::

    query_template: "Instruct: {instruction}\\nQuery: {query}"   # optional; this is F2LLM's (the default)
    datasets:
      msmarco:   {type: retrieval, instruction: "Given a web search query, retrieve relevant passages"}
      amazon_cf: {type: classification, instruction: "Classify the given Amazon review"}
      arxiv_p2p: {type: clustering}            # no instruction: the query is stored as is

Documents never carry an instruction. :func:`format_query` is the one place a query is written with its instruction
(the build, evaluation, mining and the exported sentence-transformers prompts all use it). A dataset found in the raw data but not in the registry is an error that
lists every missing name, unless a default type is given (``--default-type``); then it gets that type and no
instruction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.shard_format import DATASET_TYPES, DEFAULT_QUERY_TEMPLATE
from pipeline.mapping_file import read_mapping


class RegistryError(ValueError):
    """A bad registry file or a dataset without an entry; the message names the file and key."""


def format_query(template: str, instruction: str | None, query: str) -> str:
    """`query` as the model sees it: the template filled with the instruction, or the query alone without one."""
    if not instruction:
        return query
    return template.format(instruction=instruction, query=query)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    type: str
    instruction: str | None


@dataclass(frozen=True)
class Registry:
    datasets: dict[str, DatasetSpec]
    query_template: str = DEFAULT_QUERY_TEMPLATE

    def format_query(self, spec: DatasetSpec, query: str) -> str:
        return format_query(self.query_template, spec.instruction, query)

    def resolve(self, names: list[str], default_type: str | None, source: str) -> list[DatasetSpec]:
        missing = [n for n in names if n not in self.datasets]
        if missing and default_type is None:
            raise RegistryError(
                f"{source}: no registry entry for dataset(s) {', '.join(sorted(missing))}; add them or pass "
                "--default-type"
            )
        return [self.datasets.get(n) or DatasetSpec(n, default_type, None) for n in names]  # type: ignore[arg-type]


def load_registry(path: str | Path | None) -> Registry:
    """Parse a registry YAML file (None -> empty registry)."""
    if path is None:
        return Registry(datasets={})
    path = Path(path)
    data = read_mapping(path, "registry", syntax="yaml", error=RegistryError)
    if not isinstance(data.get("datasets"), dict):
        raise RegistryError(f"{path}: expected a mapping with a 'datasets' mapping at the top level")
    unknown = sorted(set(data) - {"datasets", "query_template"})
    if unknown:
        raise RegistryError(f"{path}: unknown top-level key {unknown[0]!r} (valid: datasets, query_template)")
    template = data.get("query_template", DEFAULT_QUERY_TEMPLATE)
    if not isinstance(template, str) or "{query}" not in template or "{instruction}" not in template:
        raise RegistryError(f"{path}: query_template must be a string containing {{instruction}} and {{query}}")
    specs = {}
    for name, entry in data["datasets"].items():
        key = f"{path}: datasets.{name}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{key}: expected a mapping with 'type' and optional 'instruction'")
        extra = sorted(set(entry) - {"type", "instruction"})
        if extra:
            raise RegistryError(f"{key}.{extra[0]}: unknown key (valid: type, instruction)")
        dtype = entry.get("type")
        if dtype not in DATASET_TYPES:
            raise RegistryError(f"{key}.type: expected one of {', '.join(DATASET_TYPES)}, got {dtype!r}")
        instruction = entry.get("instruction")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise RegistryError(f"{key}.instruction: expected a non-empty string, got {instruction!r}")
        specs[str(name)] = DatasetSpec(str(name), dtype, instruction)
    return Registry(datasets=specs, query_template=template)


def query_formatter(
    name: str, *, instruction: str | None, registry: Registry | None, prompts: dict[str, str],
    prompt_name: str | None = None, fallback_prompts: tuple[str, ...] = (),
) -> tuple[Callable[[str], str], str]:
    """How queries of dataset `name` are written for a model outside training (evaluation, mining), and a one-line
    description of the source, from the first of: `instruction` ('' = none; the registry's template, else F2LLM's),
    the model's sentence-transformers prompt `prompt_name` (a RegistryError when the model has none of that name),
    the `registry` entry of `name`, the model's prompt named `name` (`prompts`), the first of `fallback_prompts`
    the model has (e.g. its MTEB ``Retrieval-query`` prompt), else none."""
    template = registry.query_template if registry is not None else DEFAULT_QUERY_TEMPLATE
    if instruction is not None:
        if not instruction.strip():
            return (lambda q: q), "none (--query-instruction '')"
        return (lambda q: format_query(template, instruction, q)), f"--query-instruction {instruction!r}"
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise RegistryError(f"--prompt-name {prompt_name}: the model has no prompt of that name "
                                f"(have: {', '.join(sorted(prompts)) or 'none'})")
        chosen = prompts[prompt_name]
        return (lambda q: chosen + q), f"model prompt {prompt_name!r}"
    if registry is not None and name in registry.datasets:
        spec = registry.datasets[name]
        if spec.instruction:
            return (lambda q: registry.format_query(spec, q)), f"registry: {spec.instruction!r}"
        return (lambda q: q), "none (registry entry has no instruction)"
    for key in (name, *fallback_prompts):
        if key in prompts:
            prompt = prompts[key]
            return (lambda q: prompt + q), f"model prompt {key!r}"
    return (lambda q: q), "none"
