"""The small interface every format backend implements.

A backend turns a source snapshot into files for some variants (``build``), checks the files
structurally (``inspect``) and loads one variant in its own runtime (``load``) so that
``hubbot.validate`` can compare it with the source model. Everything format-specific — its
precision table, default repo naming, options, tool versions — lives in the backend module.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Naming:
    """Where a variant lands: which repo (``repo``) and which path inside it (``path``)."""

    repo: str
    path: str


class Runtime(Protocol):
    """A variant loaded in its own runtime, as validation drives it."""

    def tokenize(self, text: str) -> list[int]: ...

    def top1(self, ids: Sequence[int]) -> list[int]:
        """Greedy next-token prediction at every position of ``ids`` (one forward pass)."""

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids``; stops after emitting a token in ``stop_ids``."""

    def close(self) -> None: ...


@dataclass
class Built:
    """A variant's files after ``build``: ``path`` is relative to the repo folder."""

    variant_id: str
    path: str
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


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
              log: Log) -> list[Built]:
        """Write every variant's files under ``repo_dir`` (at ``variant.path``)."""

    @abstractmethod
    def inspect(self, snapshot: Snapshot, variant: Variant, repo_dir: Path) -> dict[str, Any]:
        """Structural checks of the built files; raise BuildError when they do not hold."""

    @abstractmethod
    def load(self, variant: Variant, repo_dir: Path) -> Runtime | None:
        """Load the variant in its runtime, or None when this machine cannot run its target."""


def formats() -> list[str]:
    """Every format with a module here: hubbot/backends/<format>.py defining BACKEND."""
    package = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(package)]) if m.name not in ("base", "__init__"))


def get_backend(fmt: str) -> Backend:
    if fmt not in formats():
        raise KeyError(fmt)
    return importlib.import_module(f"{__package__}.{fmt}").BACKEND()
