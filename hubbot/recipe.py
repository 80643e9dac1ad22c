"""Recipe files: one YAML per model family under ``recipes/``, strictly validated.

A family file names its models (aliases → Hub ids), where its releases appear (for ``watch``),
how validation judges variants, and named recipes (``edge``, ``pc`` …) that each pick a set of
variants (format × precision × target × options). Any mistake raises RecipeError naming the
file, the key path and what is allowed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .backends import OptionError, formats, get_backend
from .backends.support import ARCHITECTURES
from .errors import RecipeError, UsageError
from .paths import bundled
from .runners import HOSTED, RunnerClass, parse_size

NAMING_FIELDS = {"model", "quant", "precision", "target", "format", "variant", "group"}
DEFAULT_PROMPTS = [
    {"name": "count", "text": "Count: 1, 2, 3, 4, 5,"},
    {"name": "count-chat", "chat": "Count from 1 to 10."},
]
DEFAULT_THRESHOLDS = {"fp32": 1.0, "fp16": 1.0, "bf16": 1.0, "int8": 0.98, "int6": 0.95,
                      "int5": 0.9, "int4": 0.85, "int3": 0.6, "int2": 0.4}


def recipes_dir() -> Path:
    """HUBBOT_RECIPES_DIR, or the recipes shipped with hubbot (the repo's ``recipes/``)."""
    return Path(os.environ.get("HUBBOT_RECIPES_DIR") or bundled("recipes"))


@dataclass(frozen=True)
class VariantSpec:
    format: str
    precision: str
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    min_agreement: float | None = None


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    chat: bool  # text is a user message, rendered with the model's chat template


@dataclass(frozen=True)
class ValidationSettings:
    prompts: tuple[Prompt, ...]
    thresholds: dict[str, float]
    max_new_tokens: int = 16
    heldout: str | None = None  # name of the held text (recipes/heldout/<name>.txt): KLD and perplexity
    heldout_text: str = ""  # its content (so the reference's key changes when the text does)
    heldout_window: int = 512  # tokens per teacher-forced window over the held text
    heldout_top_k: int = 64  # source log-probs kept per position in the reference (hubbot.metrics)
    max_mean_kld: dict[str, float] = field(default_factory=dict)  # by precision class or native type
    chat_gate_tokens: int = 0  # a chat answer diverging before this many tokens fails the variant

    def threshold(self, native: str, precision_class: str) -> float:
        for key in (native, native.lower(), precision_class):
            if key in self.thresholds:
                return self.thresholds[key]
        return DEFAULT_THRESHOLDS.get(precision_class, 0.0)

    def max_kld(self, native: str, precision_class: str) -> float | None:
        """The largest mean KLD a variant may have over the held text; None: not gated."""
        for key in (native, native.lower(), precision_class):
            if key in self.max_mean_kld:
                return self.max_mean_kld[key]
        return None


@dataclass(frozen=True)
class Model:
    alias: str
    repo: str
    license: str | None = None
    architecture: str | None = None  # config.json's architectures[0], so a plan knows it before download


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    variants: tuple[VariantSpec, ...]


@dataclass
class Family:
    name: str
    title: str
    path: Path
    architectures: tuple[str, ...]
    models: dict[str, Model]
    authors: tuple[str, ...]
    name_patterns: tuple[str, ...]
    default_recipe: str
    naming: dict[str, dict[str, str]]
    validation: ValidationSettings
    recipes: dict[str, Recipe]
    runners: tuple[RunnerClass, ...] = (HOSTED,)  # where a fanned-out build job may run

    def recipe(self, name: str) -> Recipe:
        if name not in self.recipes:
            raise UsageError(f"family '{self.name}' has no recipe '{name}' ({self.path}); "
                             f"known: {', '.join(self.recipes)}")
        return self.recipes[name]

    def model_for_repo(self, repo_id: str) -> Model | None:
        return next((m for m in self.models.values() if m.repo.lower() == repo_id.lower()), None)

    def matches_repo(self, repo_id: str) -> bool:
        author, _, name = repo_id.partition("/")
        if self.model_for_repo(repo_id):
            return True
        return author in self.authors and any(fnmatch.fnmatch(name.lower(), p.lower())
                                              for p in self.name_patterns)


class _Checker:
    """Walks the parsed YAML, raising RecipeError with the exact key path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> RecipeError:
        return RecipeError(self.path, key, message)

    def mapping(self, value: Any, key: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"unknown key; allowed: {', '.join(sorted(allowed))}")
        for k in required:
            if k not in value:
                raise self.fail(key or "(top level)", f"missing required key '{k}'")
        return value

    def typed(self, value: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(key, f"must be {what}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(key, f"must be {what}, got {type(value).__name__} {value!r}")
        return value

    def string_list(self, value: Any, key: str) -> tuple[str, ...]:
        self.typed(value, key, list, "a list of strings")
        for i, item in enumerate(value):
            self.typed(item, f"{key}[{i}]", str, "a string")
        return tuple(value)

    def template(self, value: Any, key: str) -> str:
        self.typed(value, key, str, "a string template")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as e:
            raise self.fail(key, f"bad template {value!r}: {e}") from None
        unknown = fields - NAMING_FIELDS
        if unknown:
            raise self.fail(key, f"unknown field(s) {', '.join('{' + f + '}' for f in sorted(unknown))}; "
                                 f"allowed: {', '.join('{' + f + '}' for f in sorted(NAMING_FIELDS))}")
        return value


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise RecipeError(path, where, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(path, "", "must be a YAML mapping with 'family' and 'recipes'")
    return data


def _parse_variant(c: _Checker, raw: Any, key: str) -> VariantSpec:
    c.mapping(raw, key, {"format", "precision", "target", "options", "min_agreement"},
              {"format", "precision"})
    fmt = c.typed(raw["format"], f"{key}.format", str, "a string")
    if fmt not in formats():
        raise c.fail(f"{key}.format", f"unknown format '{fmt}'; allowed: {', '.join(formats())}")
    backend = get_backend(fmt)
    precision = str(c.typed(raw["precision"], f"{key}.precision", (str, int), "a string"))
    try:
        backend.native_type(precision)
    except KeyError:
        raise c.fail(f"{key}.precision", f"'{precision}' is not a {fmt} precision; allowed: "
                                         f"{', '.join(backend.allowed_precisions())}") from None
    target = c.typed(raw.get("target", backend.default_target), f"{key}.target", str, "a string")
    if target not in backend.targets:
        raise c.fail(f"{key}.target", f"'{target}' is not a {fmt} target; allowed: {', '.join(backend.targets)}")
    options = c.mapping(raw.get("options", {}), f"{key}.options", set(backend.options))
    for name, value in options.items():
        c.typed(value, f"{key}.options.{name}", backend.options[name], backend.options[name].__name__)
    try:
        backend.check_options(backend.native_type(precision).name, target, options)
    except OptionError as e:
        raise c.fail(f"{key}.options", str(e)) from None
    min_agreement = raw.get("min_agreement")
    if min_agreement is not None:
        c.typed(min_agreement, f"{key}.min_agreement", (int, float), "a number from 0 to 1")
        if not 0 <= min_agreement <= 1:
            raise c.fail(f"{key}.min_agreement", f"must be from 0 to 1, got {min_agreement}")
    return VariantSpec(fmt, precision, target, dict(options), min_agreement)


def _parse_validation(c: _Checker, raw: Any) -> ValidationSettings:
    c.mapping(raw, "validation", {"prompts", "thresholds", "max_new_tokens", "heldout", "heldout_window",
                                  "heldout_top_k", "max_mean_kld", "chat_gate_tokens"})
    prompts = []
    for i, p in enumerate(c.typed(raw.get("prompts", DEFAULT_PROMPTS), "validation.prompts", list, "a list")):
        key = f"validation.prompts[{i}]"
        c.mapping(p, key, {"name", "text", "chat"}, {"name"})
        if ("text" in p) == ("chat" in p):
            raise c.fail(key, "give exactly one of 'text' (plain prompt) or 'chat' (a user message)")
        body = p.get("text", p.get("chat"))
        c.typed(body, key, str, "a string")
        prompts.append(Prompt(c.typed(p["name"], f"{key}.name", str, "a string"), body, "chat" in p))
    if not prompts:
        raise c.fail("validation.prompts", "needs at least one prompt")
    thresholds = dict(DEFAULT_THRESHOLDS)
    for name, value in c.mapping(raw.get("thresholds", {}), "validation.thresholds",
                                 _all_precision_names()).items():
        c.typed(value, f"validation.thresholds.{name}", (int, float), "a number from 0 to 1")
        if not 0 <= value <= 1:
            raise c.fail(f"validation.thresholds.{name}", f"must be from 0 to 1, got {value}")
        thresholds[name] = float(value)
    max_new = c.typed(raw.get("max_new_tokens", 16), "validation.max_new_tokens", int, "a whole number")
    if not 1 <= max_new <= 512:
        raise c.fail("validation.max_new_tokens", f"must be from 1 to 512, got {max_new}")
    return ValidationSettings(tuple(prompts), thresholds, max_new, **_parse_metrics(c, raw))


def _whole_number(c: _Checker, raw: dict, key: str, default: int, low: int, high: int) -> int:
    value = c.typed(raw.get(key, default), f"validation.{key}", int, "a whole number")
    if not low <= value <= high:
        raise c.fail(f"validation.{key}", f"must be from {low} to {high}, got {value}")
    return value


def heldout_path(recipe_file: Path, name: str) -> Path:
    """``heldout/<name>.txt`` beside the recipe file, else the one shipped with hubbot's recipes."""
    own = recipe_file.parent / "heldout" / f"{name}.txt"
    shipped = bundled("recipes") / "heldout" / f"{name}.txt"
    return own if own.is_file() or not shipped.is_file() else shipped


def _parse_metrics(c: _Checker, raw: dict) -> dict[str, Any]:
    """The held-text metrics and the chat gate (hubbot.metrics, hubbot.validate)."""
    heldout, text = raw.get("heldout"), ""
    if heldout is not None:
        c.typed(heldout, "validation.heldout", str, "the name of a text file under heldout/")
        path = heldout_path(c.path, heldout)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise c.fail("validation.heldout", f"cannot read {path} ({type(e).__name__}); put the held text "
                                               f"there as UTF-8") from None
        if len(text.split()) < 200:
            raise c.fail("validation.heldout", f"{path} has {len(text.split())} words; a held text needs "
                                               f"at least 200 (1-2k tokens) to measure anything")
    max_kld = {}
    for name, value in c.mapping(raw.get("max_mean_kld", {}), "validation.max_mean_kld",
                                 _all_precision_names()).items():
        c.typed(value, f"validation.max_mean_kld.{name}", (int, float), "a number of nats, 0 or more")
        if value < 0:
            raise c.fail(f"validation.max_mean_kld.{name}", f"must be 0 or more, got {value}")
        max_kld[name] = float(value)
    if max_kld and heldout is None:
        raise c.fail("validation.max_mean_kld", "needs validation.heldout, the text the KLD is measured on")
    return {"heldout": heldout, "heldout_text": text, "max_mean_kld": max_kld,
            "heldout_window": _whole_number(c, raw, "heldout_window", 512, 16, 8192),
            "heldout_top_k": _whole_number(c, raw, "heldout_top_k", 64, 1, 4096),
            "chat_gate_tokens": _whole_number(c, raw, "chat_gate_tokens", 0, 0, 512)}


def _all_precision_names() -> set[str]:
    names = set(DEFAULT_THRESHOLDS)
    for fmt in formats():
        names |= set(get_backend(fmt).allowed_precisions())
    return names


def load_family(path: Path) -> Family:
    path = Path(path)
    data = _load_yaml(path)
    c = _Checker(path)
    c.mapping(data, "", {"family", "title", "architectures", "models", "watch", "naming",
                         "validation", "recipes", "runners"}, {"family", "recipes"})
    name = c.typed(data["family"], "family", str, "a string")
    models = {}
    for alias, m in c.mapping(data.get("models", {}), "models", set(data.get("models") or {})).items():
        c.mapping(m, f"models.{alias}", {"repo", "license", "architecture"}, {"repo"})
        repo = c.typed(m["repo"], f"models.{alias}.repo", str, "a Hub repo id")
        if repo.count("/") != 1:
            raise c.fail(f"models.{alias}.repo", f"'{repo}' is not a Hub repo id (owner/name)")
        architecture = m.get("architecture")
        if architecture is not None and architecture not in ARCHITECTURES:
            raise c.fail(f"models.{alias}.architecture",
                         f"'{architecture}' is not in hubbot's support table; known: {', '.join(ARCHITECTURES)}")
        models[alias] = Model(alias, repo, m.get("license"), architecture)
    watch = c.mapping(data.get("watch", {}), "watch", {"authors", "name_patterns", "default_recipe"})
    naming = {}
    for fmt, tpl in c.mapping(data.get("naming", {}), "naming", set(formats())).items():
        c.mapping(tpl, f"naming.{fmt}", {"repo", "path"})
        naming[fmt] = {k: c.template(v, f"naming.{fmt}.{k}") for k, v in tpl.items()}
        if "/" in naming[fmt].get("repo", ""):
            raise c.fail(f"naming.{fmt}.repo", "is a repo name without namespace; '/' is not allowed")
    recipes = {}
    for rname, r in c.mapping(data["recipes"], "recipes", set(data["recipes"] or {})).items():
        key = f"recipes.{rname}"
        c.mapping(r, key, {"description", "variants"}, {"variants"})
        raw_variants = c.typed(r["variants"], f"{key}.variants", list, "a list of variants")
        if not raw_variants:
            raise c.fail(f"{key}.variants", "needs at least one variant")
        variants = tuple(_parse_variant(c, v, f"{key}.variants[{i}]") for i, v in enumerate(raw_variants))
        recipes[rname] = Recipe(rname, str(r.get("description", "")), variants)
    if not recipes:
        raise c.fail("recipes", "needs at least one named recipe")
    default_recipe = watch.get("default_recipe", next(iter(recipes)))
    if default_recipe not in recipes:
        raise c.fail("watch.default_recipe", f"'{default_recipe}' is not a recipe here; known: {', '.join(recipes)}")
    return Family(
        name=name, title=str(data.get("title", name)), path=path,
        architectures=c.string_list(data.get("architectures", []), "architectures"),
        models=models,
        authors=c.string_list(watch.get("authors", []), "watch.authors"),
        name_patterns=c.string_list(watch.get("name_patterns", []), "watch.name_patterns"),
        default_recipe=default_recipe, naming=naming,
        validation=_parse_validation(c, data.get("validation", {})),
        recipes=recipes,
        runners=_parse_runners(c, data["runners"]) if "runners" in data else (HOSTED,),
    )


def _parse_runners(c: _Checker, data: Any) -> tuple[RunnerClass, ...]:
    classes = []
    for name, r in c.mapping(data, "runners", set(data or {}) if isinstance(data, dict) else set()).items():
        key = f"runners.{name}"
        c.mapping(r, key, {"runs-on", "memory", "disk", "free-disk"}, {"runs-on", "memory", "disk"})
        labels = r["runs-on"]
        if isinstance(labels, list):
            labels = c.string_list(labels, f"{key}.runs-on")
        else:
            c.typed(labels, f"{key}.runs-on", str, "a runner label or a list of labels")
        sizes = {}
        for field_name in ("memory", "disk"):
            try:
                sizes[field_name] = parse_size(r[field_name])
            except ValueError as e:
                raise c.fail(f"{key}.{field_name}", str(e)) from None
        free_disk = c.typed(r.get("free-disk", False), f"{key}.free-disk", bool, "true or false")
        classes.append(RunnerClass(str(name), labels, sizes["memory"], sizes["disk"], free_disk))
    if not classes:
        raise c.fail("runners", "needs at least one runner class (or leave it out for GitHub's ubuntu-latest)")
    return tuple(classes)


def load_families(directory: Path | None = None) -> dict[str, Family]:
    directory = Path(directory or recipes_dir())
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        raise UsageError(f"no recipe files (*.yaml) in {directory}")
    families: dict[str, Family] = {}
    for f in files:
        fam = load_family(f)
        if fam.name in families:
            raise RecipeError(f, "family", f"'{fam.name}' is also defined in {families[fam.name].path}")
        families[fam.name] = fam
    return families


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-able object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()

