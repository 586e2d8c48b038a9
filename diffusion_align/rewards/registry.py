"""The reward-model registry: one YAML file per scorer (`reward_models/<name>.yaml`).

Each file holds where the weights come from (`source`: hub ids, file names, URLs), the preprocessing, the score
conventions (`conventions`: key -> output `column` and a one-line `description`), how a preference probability is
made from two scores, the licence and the paper. The loaders read hub ids and file names from here only.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..files import shipped_dir

REQUIRED_KEYS = ("name", "title", "paper", "licence", "source", "preprocessing", "conventions",
                 "default_convention", "preference")


def registry_dir() -> Path:
    """The folder of registry YAML files: the repository's `reward_models/`, shipped in a wheel as package data."""
    return shipped_dir("reward_models", "reward_models")


def registry_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in registry_dir().glob("*.yaml"))


def load_spec(name: str) -> dict:
    """The parsed, checked registry entry of scorer `name`."""
    path = registry_dir() / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no registry entry for scorer {name!r}: {path} does not exist")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a YAML mapping with keys {list(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; expected {list(REQUIRED_KEYS)}")
    if spec["name"] != name:
        raise ValueError(f"{path}: name is {spec['name']!r}, expected {name!r} (the file name)")
    conventions = spec["conventions"]
    if not isinstance(conventions, dict) or not conventions:
        raise ValueError(f"{path}: conventions must map convention names to {{column, description}}")
    for key, entry in conventions.items():
        if not isinstance(entry, dict) or not {"column", "description"} <= entry.keys():
            raise ValueError(f"{path}: conventions.{key} needs keys column and description, got {entry!r}")
    if spec["default_convention"] not in conventions:
        raise ValueError(f"{path}: default_convention {spec['default_convention']!r} is not one of the "
                         f"conventions {list(conventions)}")
    return spec
