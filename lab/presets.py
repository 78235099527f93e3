"""Presets: one YAML file per named VariantSpec in presets/, validated with errors naming file and field."""
from __future__ import annotations

import difflib
import os

import yaml

from lab.errors import LabError
from lab.spec import VariantSpec, from_dict

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")


def directory() -> str:
    """The presets folder every front end reads: LAB_PRESETS_DIR where it is set (your own presets, a remote
    server's among them; the tests' tests/presets/), else presets/."""
    return os.environ.get("LAB_PRESETS_DIR") or PRESETS_DIR


def load_file(path: str) -> VariantSpec:
    where = os.path.relpath(path) if os.path.isabs(path) else path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LabError(where, f"is not valid YAML{at}: {getattr(e, 'problem', e)}; fix the syntax") from e
    if data is None:
        raise LabError(where, "is empty; it needs at least `family:`")
    name = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict):
        data = {"name": name, **data}
    return from_dict(data, where)


def available(directory: str = PRESETS_DIR) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".yaml"))


def load(name: str, directory: str = PRESETS_DIR, weights: str | None = None) -> VariantSpec:
    """A preset by name; `weights` overrides the preset's weights (the CLI's --weights, the app's switch).
    A family whose weights ship with its package (hibari) keeps them: it is the real-speech reference row."""
    path = os.path.join(directory, f"{name}.yaml")
    if not os.path.exists(path):
        names = available(directory)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise LabError(f"preset {name!r}", f"no such preset; {hint}available: {', '.join(names)}")
    spec = load_file(path)
    return spec.with_weights(weights) if weights else spec


def load_all(directory: str = PRESETS_DIR) -> tuple[dict[str, VariantSpec], dict[str, str]]:
    """Every preset whose file is valid, and for the rest the reason (the field and the fix). Whether a valid one
    runs on this machine is lab.machine's question."""
    specs, errors = {}, {}
    for name in available(directory):
        try:
            specs[name] = load(name, directory)
        except LabError as e:
            errors[name] = e.message
    return specs, errors
