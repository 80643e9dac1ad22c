"""The small interface every format backend implements.

A backend turns a source snapshot into files for some variants (``build``), checks the files
structurally (``inspect``) and loads one variant in its own runtime (``load``) so that
``hubbot.validate`` can compare it with the source model. Everything format-specific — its
precision table, default repo naming, options and how to check them, tool versions — lives in the
backend module, as data where it can be.

The contract, in short:

- ``check_options`` runs while the recipe is parsed: a bad option is a RecipeError (exit 2)
  before anything is downloaded. ``build`` may assume checked options.
- ``build`` returns one ``Built`` per variant, keyed by variant id; what it measured and decided
  goes in ``Built.details``, a backend-specific ``Details`` dataclass that the format's card
  template reads.
- The toolchain is checked once per run (``require``), before anything is downloaded; ``build``
  does not check it again.
- Tools run through ``hubbot.toolrun.run_tool`` (measured, logged, interruptible).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..errors import MissingExtraError

if TYPE_CHECKING:
    from ..plan import Variant
    from ..source import Snapshot

Log = Callable[[str], None]


@dataclass(frozen=True)
class NativeType:
    """One of a format's own precision names, e.g. GGUF's Q4_K_M."""

    name: str
    precision_class: str  # fp32 | fp16 | bf16 | int8 | int6 | int5 | int4 | int3 | int2
    bits_per_weight: float  # for size estimates only


def type_table(*types: NativeType) -> dict[str, NativeType]:
    return {t.name: t for t in types}


@dataclass(frozen=True)
class Naming:
    """Where a variant lands: which repo (``repo``) and which path inside it (``path``)."""

    repo: str
    path: str


class Runtime(Protocol):
    """A variant loaded in its own runtime, as validation drives it.

    A runtime for which one forward pass over many sequences is much cheaper than one per sequence
    (MLX's CPU backend dequantizes every weight per pass) may also offer ``top1_all(sequences)``
    (``top1`` of each), ``window_logits(parts)`` (``logits`` of each part, yielded in order) and
    ``generate_all(prompts, max_new_tokens, stop_ids, on_step)`` (``generate`` of each, with a length
    each); validation uses them where present. A ``note`` attribute (a line on how it runs, e.g. on a slow
    path) is logged before validation."""

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` from the runtime's own detokenizer, special tokens shown, as its users see it."""

    def stop_ids(self) -> set[int]:
        """The ids that end generation by the runtime's own generation config (not the ones validation passes)."""

    def top1(self, ids: Sequence[int]) -> list[int]:
        """Greedy next-token prediction at every position of ``ids`` (one forward pass)."""

    def logits(self, ids: Sequence[int]) -> Any:
        """Next-token logits at every position of ``ids``: a float32 numpy array (len(ids), vocab),
        from one forward pass (``hubbot.metrics`` calls it one window at a time)."""

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids``; stops after emitting a token in ``stop_ids``."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Details:
    """What a backend measured and decided while building one variant (its card template reads it)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Built:
    """A variant's files after ``build``: paths relative to the repo folder."""

    files: list[str]
    seconds: float
    details: Details = field(default_factory=Details)


class OptionError(ValueError):
    """A variant's options do not fit its format, precision or target (the recipe is at fault)."""


class Backend(ABC):
    name: ClassVar[str]
    extra: ClassVar[str]  # pip extra that installs the toolchain: hubbot[<extra>]
    library_name: ClassVar[str]  # the Hub's library_name for the card
    tags: ClassVar[tuple[str, ...]]
    required_modules: ClassVar[tuple[str, ...]]
    targets: ClassVar[tuple[str, ...]]
    default_target: ClassVar[str]
    precisions: ClassVar[Mapping[str, str]]  # first-class precision -> default native type
    native_types: ClassVar[Mapping[str, NativeType]]
    options: ClassVar[Mapping[str, type]] = {}
    naming: ClassVar[Naming]
    template: ClassVar[str]  # card template under templates/

    def require(self) -> None:
        """Raise MissingExtraError naming the extra when the toolchain is not importable."""
        for module in self.required_modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise MissingExtraError(self.name, self.extra, module) from None

    def native_type(self, precision: str) -> NativeType:
        """Map a recipe precision (first-class or native, any case) to the native type."""
        native = self.precisions.get(precision.lower(), precision)
        for name, info in self.native_types.items():
            if name.lower() == native.lower():
                return info
        raise KeyError(precision)

    def allowed_precisions(self) -> list[str]:
        return [*self.precisions, *self.native_types]

    def check_options(self, native: str, target: str, options: Mapping[str, Any]) -> None:  # noqa: B027
        """Raise OptionError when the (already type-checked) options cannot apply to this variant."""

    def slug(self, native: str, target: str, options: Mapping[str, Any]) -> str:
        """A short, stable name for the variant, used in ids and paths."""
        parts = [native, target if target != self.default_target else ""]
        parts += [f"{k}-{v}" for k, v in sorted(options.items())]
        return "-".join(p for p in parts if p)

    def group(self, target: str) -> str:
        """A folder that groups variants inside a repo, for the ``{group}`` naming field."""
        return ""

    @abstractmethod
    def tool_versions(self) -> dict[str, str]: ...

    @abstractmethod
    def build(self, snapshot: Snapshot, variants: Sequence[Variant], repo_dir: Path, workdir: Path,
              log: Log) -> dict[str, Built]:
        """Write every variant's files under ``repo_dir`` (at ``variant.path``), keyed by variant id."""

    @abstractmethod
    def inspect(self, snapshot: Snapshot, variant: Variant, repo_dir: Path) -> dict[str, Any]:
        """Structural checks of the built files; raise BuildError when they do not hold."""

    @abstractmethod
    def load(self, variant: Variant, repo_dir: Path) -> Runtime | None:
        """Load the variant in its runtime, or None when this machine cannot run its target."""
