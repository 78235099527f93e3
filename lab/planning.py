"""One door from what a person typed to what runs. The page's Compare, Blind A/B and How many tabs and the command
line all plan here, so the same input is refused, or noted, with the same words everywhere (docs/DESIGN.md,
"Planning"). Torch-free: it reads presets and checks values, and builds nothing.

Errors name the form's field ("text", "seed", "runs per preset", "max_audio_s", "user_audio", "presets",
"streams", or the preset); the CLI shows its flag for the same field (lab.bench.FLAGS).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import random
from dataclasses import dataclass
from typing import Sequence

from lab import ab, env, machine
from lab.availability import Catalog
from lab.concurrency import parse_levels
from lab.errors import LabError
from lab.request import MAX_TEXT_CHARS, Request, read_audio_file, validate_inputs, validate_user_audio
from lab.spec import VariantSpec

AB_MAX_AUDIO_S = 10.0   # a blind pair's cap on audio length: both sides say the same short text once


@dataclass(frozen=True)
class Plan:
    """What to build (specs, in the order chosen), what each says (request), how often (warm runs per preset), and
    what the person should read about it without being refused: (field, sentence) notes."""
    specs: tuple[VariantSpec, ...]
    request: Request
    runs: int
    notes: tuple[tuple[str, str], ...] = ()
    levels: tuple[int, ...] = ()   # a sweep's stream counts (How many, --streams); empty for a comparison

    def notes_at(self, field: str) -> list[str]:
        return [sentence for where, sentence in self.notes if where == field]


def plan(catalog: Catalog, names: Sequence[str], text, seed, max_audio_s, runs, *, weights: str | None = None,
         user_audio: str | None = None, extra_specs: Sequence[VariantSpec] = (), most_presets: int | None = None,
         streams: str | None = None, max_chars: int = MAX_TEXT_CHARS) -> Plan:
    """The comparison (or sweep) that raw inputs ask for, or a LabError naming the field and the fix.

    `names`: presets from the catalog's folder, in the order chosen; `extra_specs`: presets from files of the
    person's own (the CLI's --preset-file). `weights`: None keeps each preset's own, else "random" (the page's
    switch), "tiny" or "pretrained" (the CLI's --weights). `user_audio`: a path to a spoken turn, sent to the
    presets that take one. `most_presets`: the page's players. `streams`: "1,16,256" plans a sweep instead.
    Checked in the form's order: which presets, the numbers and the text, each preset, the streams, the turn."""
    names = [str(n) for n in names]
    _check_choice(catalog, names, len(extra_specs), most_presets)
    request, runs = validate_inputs(text, seed, max_audio_s, runs, max_chars)
    specs = [preset_spec(catalog, n, weights) for n in names]
    for spec in extra_specs:
        spec = spec.with_weights(weights) if weights else spec
        machine.require(spec)
        specs.append(spec)
    levels = _levels(streams, specs) if streams is not None else ()
    notes = [("text", note) for note in request.text_notes]
    if user_audio is not None:
        request, turn_notes = _with_turn(request, user_audio, specs)
        notes += [("user_audio", note) for note in turn_notes]
    return Plan(tuple(specs), request, runs, tuple(notes), tuple(levels))


def plan_pair(catalog: Catalog, first, second, text, seed, weights: str | None = None,
              rng: random.Random | None = None) -> Plan:
    """A blind pair: the same text and seed through two presets, one warm run each; which plays as A is drawn
    here, once (specs are (A, B))."""
    a, b = ab.blind_order(first, second, rng)
    return plan(catalog, [a, b], text, seed, AB_MAX_AUDIO_S, 1, weights=weights)


def preset_spec(catalog: Catalog, name: str, weights: str | None = None) -> VariantSpec:
    """The spec to run for a preset of the catalog, or a LabError with the reason it cannot run here. Statuses for
    a preset's own weights and for random weights are the catalog's, checked once (the hub probe is slow)."""
    where = f"preset {name!r}"
    if name in catalog.broken:   # an invalid file is named by its path, as the house's errors are
        shown = os.path.join(env.shown_path(catalog.presets_dir), f"{name}.yaml")
        raise LabError(shown, catalog.broken[name].sentence)
    if name not in catalog.specs:
        raise LabError(where, _unknown(name, sorted(catalog.specs)))
    if weights in (None, "random"):
        refusal = catalog.statuses[weights == "random"][name].refusal
        spec = catalog.spec(name, weights == "random")
    else:
        spec = catalog.specs[name].with_weights(weights)
        refusal = machine.check(spec)
    if refusal is not None:
        raise LabError(where, refusal.sentence)
    return spec


def _check_choice(catalog: Catalog, names: list[str], extra: int, most: int | None) -> None:
    if not names and not extra:
        raise LabError("presets", f"none chosen; choose at least one of: {', '.join(sorted(catalog.specs))}")
    if most is not None and len(names) + extra > most:
        raise LabError("presets", f"{len(names) + extra} chosen; a comparison takes at most {most}, drop some")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LabError("presets", f"{', '.join(twice)} chosen twice; choose each preset once (more runs: raise "
                                  f"the warm runs per preset)")


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    if os.sep in name or "/" in name or name.endswith((".yaml", ".yml")):
        hint = "that is a path: a preset file of your own goes with --preset-file; "
    return f"no such preset; {hint}available: {', '.join(known)}"


def _levels(streams: str, specs: list[VariantSpec]) -> list[int]:
    """A batching preset takes at most its slots at once; any other serves the streams one after another."""
    slots = [s.max_streams for s in specs if s.batches]
    return parse_levels(streams, most=min(slots) if slots else None)


def _with_turn(request: Request, path: str, specs: list[VariantSpec]) -> tuple[Request, list[str]]:
    """The spoken turn, read and checked whoever would hear it (what is not audio is refused by name), sent to the
    presets that take one; the others are named in a note, since a mixed comparison is still worth running."""
    samples, sample_rate = read_audio_file(path)
    samples = validate_user_audio(samples, sample_rate)
    deaf = [s.name for s in specs if not s.takes_user_audio]
    if len(deaf) == len(specs):
        return request, ["not sent: none of these presets takes a spoken turn; they say the text only"]
    request = dataclasses.replace(request, user_audio=samples, user_audio_sample_rate=int(sample_rate))
    return request, [f"ignored by {', '.join(deaf)}, which take text only"] if deaf else []
