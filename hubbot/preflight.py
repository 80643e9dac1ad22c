"""preflight: does this machine have the memory and disk for a run, before anything is downloaded?

The source's size comes from safetensors headers only: a local folder's own files, or for a Hub
source ``HfApi.get_safetensors_metadata`` (ranged reads of the first bytes of each weight file).
Each variant's peak RAM and disk follow from the cost table in ``hubbot.backends.costs``; a run's
peak RAM is its largest variant's (steps run one at a time), its disk is the source download,
the largest repo's intermediates and outputs, and the outputs kept under ``--out``.

What the machine has: ``HUBBOT_AVAILABLE_MEMORY`` if set (bytes, or with a unit: ``24GB``,
``16GiB``), else Linux's MemAvailable (lowered to the cgroup v2 ``memory.max`` minus its anonymous
memory when a container limit is lower), else macOS's ``hw.memsize``. Free disk:
``HUBBOT_FREE_DISK`` if set, else ``shutil.disk_usage`` of each folder the run writes to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import costs
from .backends.costs import DTYPE_BYTES, ToolCost
from .card import human_size
from .errors import UsageError
from .plan import Plan, Variant, make_plan, parameters_by_dtype
from .recipe import Recipe
from .runners import parse_size
from .source import SourceRef, read_config

MEMORY_ENV = "HUBBOT_AVAILABLE_MEMORY"
DISK_ENV = "HUBBOT_FREE_DISK"
Log = Callable[[str], None]


class PreflightError(UsageError):
    """The run would not fit in this machine's memory or disk; nothing was downloaded or built."""


class SizeUnknown(Exception):
    """The source's parameter count could not be read (the message says why)."""


@dataclass(frozen=True)
class SourceSize:
    parameters: int
    dtype: str  # the safetensors dtype most parameters are stored in, e.g. "BF16"

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> SourceSize | None:
        """From parameters per dtype, as safetensors headers and the Hub's metadata give them."""
        if not sum(counts.values()):
            return None
        return cls(sum(counts.values()), max(counts, key=counts.get))


@dataclass(frozen=True)
class Phase:
    """One step of a variant's build or validation and the RAM it takes."""

    what: str
    ram_bytes: int


@dataclass(frozen=True)
class Estimate:
    """One variant built and validated on its own (what ``hubbot build --variant`` does)."""

    variant_id: str
    peak_ram_bytes: int
    disk_bytes: int  # source download (Hub sources) + its intermediate + its own files
    why: str  # what sets the RAM peak
    build: Phase  # its biggest build step (the hubbot process included)
    reference: Phase  # validation: the source model in transformers (the same for every variant) …
    runtime: Phase  # … plus the variant in its own runtime

    @property
    def validation_ram_bytes(self) -> int:
        return costs.PROCESS_BYTES + self.reference.ram_bytes + self.runtime.ram_bytes


NO_REFERENCE = Phase("no source model (a precomputed reference)", 0)


@dataclass(frozen=True)
class DiskNeed:
    what: str  # "the working files", "the source download", "the output folders"
    path: Path
    bytes: int


@dataclass(frozen=True)
class RunEstimate:
    peak_ram_bytes: int
    disk: list[DiskNeed]
    variants: dict[str, Estimate] = field(default_factory=dict)

    @property
    def disk_bytes(self) -> int:
        return sum(d.bytes for d in self.disk)


# ------------------------------------------------------------------------------- estimates
def steps(variant: Variant) -> list[ToolCost]:
    """The build steps a variant goes through, each one process at a time."""
    fmt, native = variant.format, variant.native
    if fmt == "gguf":
        return [costs.STEPS["gguf", "convert-f32" if native == "F32" else "convert"], costs.STEPS["gguf", "quantize"]]
    if fmt == "onnx":
        from .backends.onnx import BASE_PRECISION, OnnxBackend

        if OnnxBackend.two_step(variant):
            return [costs.STEPS["onnx", f"builder-{BASE_PRECISION[variant.target]}"], costs.STEPS["onnx", "quantizer"]]
        if native in ("int4", "int8"):
            return [costs.STEPS["onnx", "builder-quantized"]]
        return [costs.STEPS["onnx", f"builder-{native}"]]
    if fmt == "openvino":
        return [costs.STEPS["openvino", f"export-{native.split('_')[0]}"]]
    return [costs.STEPS[fmt, "convert"]]


def intermediate_bytes(variants: Sequence[Variant], parameters: int) -> int:
    """Disk the build of one repo's ``variants`` needs beside their outputs: its largest step's
    intermediate, none where a GGUF set is the converter's output itself (``is_the_conversion``)."""
    from .backends.gguf import is_the_conversion

    if all(v.format == "gguf" for v in variants) and is_the_conversion(variants):
        return 0
    return max(s.disk(parameters) for v in variants for s in steps(v))


DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def reference_phase(parameters: int, dtype: str) -> Phase:
    """The source model in transformers, the same for every variant of a source."""
    if costs.REFERENCE_DTYPE is None or costs.REFERENCE_DTYPE == dtype:
        return Phase(f"the source model in transformers ({DTYPE_NAMES.get(dtype, dtype)}, memory-mapped)",
                     int(parameters * costs.REFERENCE_MAPPED_BYTES_PER_PARAM))
    per_param = DTYPE_BYTES.get(costs.REFERENCE_DTYPE, 4)
    return Phase(f"the source model in transformers in {DTYPE_NAMES.get(costs.REFERENCE_DTYPE)} "
                 f"({per_param:g} B/param)", int(parameters * per_param))


def runtime_phase(variant: Variant, file_bytes: int) -> Phase:
    cost = costs.RUNTIMES[variant.format]
    if cost.targets is not None and variant.target not in cost.targets:
        return Phase(f"no runtime ({variant.target} variants are checked structurally)", 0)
    return Phase(cost.what, cost.ram(file_bytes, variant.native))


def estimate_variant(plan: Plan, variant: Variant, parameters: int, dtype: str, reference: bool = True) -> Estimate:
    output = variant.file_bytes(parameters)
    build_steps = steps(variant)
    build = max((Phase(s.what, costs.PROCESS_BYTES + s.ram(parameters)) for s in build_steps),
                key=lambda p: p.ram_bytes)
    runtime = runtime_phase(variant, output)
    reference = reference_phase(parameters, dtype) if reference else NO_REFERENCE
    validation = costs.PROCESS_BYTES + reference.ram_bytes + runtime.ram_bytes
    peak, why = max((build.ram_bytes, build.what), (validation, f"validation: {reference.what} + {runtime.what}"))
    download = 0 if plan.source.is_local else _source_bytes(parameters, dtype)
    disk = download + intermediate_bytes([variant], parameters) + output
    return Estimate(variant.id, peak, disk, why, build, reference, runtime)


def reference_job(plan: Plan, parameters: int, dtype: str) -> tuple[int, int]:
    """(peak RAM, disk) of computing the reference alone (``hubbot reference``): the source download
    and the source model in transformers."""
    download = 0 if plan.source.is_local else _source_bytes(parameters, dtype)
    return costs.PROCESS_BYTES + reference_phase(parameters, dtype).ram_bytes, download


def estimate(plan: Plan, parameters: int, dtype: str, reference: bool = True) -> dict[str, Estimate]:
    """Peak RAM and disk of every variant of ``plan`` for a source of ``parameters`` in ``dtype``;
    ``reference`` False: validation reuses a precomputed reference (``build --reference``)."""
    return {v.id: estimate_variant(plan, v, parameters, dtype, reference) for v in plan.variants}


def _source_bytes(parameters: int, dtype: str) -> int:
    return int(parameters * DTYPE_BYTES.get(dtype, 4))


def estimate_run(plan: Plan, parameters: int, dtype: str, *, variant_ids: Iterable[str] | None = None,
                 workdir: Path | None = None, out_dir: Path | None = None, staged: bool = True,
                 reference: bool = True) -> RunEstimate:
    """The whole run: ``staged`` (publish) builds each repo in the workdir and copies it to ``out_dir``;
    unstaged (build --variant) writes the variant's files straight into ``out_dir``."""
    wanted = set(variant_ids) if variant_ids is not None else {v.id for v in plan.variants}
    per_variant = {v.id: estimate_variant(plan, v, parameters, dtype, reference) for v in plan.variants
                   if v.id in wanted}
    repos = [[v for v in r.variants if v.id in wanted] for r in plan.repos]
    repos = [vs for vs in repos if vs]
    outputs = [sum(v.file_bytes(parameters) for v in vs) for vs in repos]
    # one intermediate per format at a time; a repo's variants stay in the workdir until it is pushed
    intermediates = [intermediate_bytes(vs, parameters) for vs in repos]
    disk = [DiskNeed("the working files", Path(workdir or tempfile.gettempdir()),
                     max((i + (o if staged or out_dir is None else 0) for i, o in zip(intermediates, outputs)),
                         default=0))]
    if not plan.source.is_local:
        disk.append(DiskNeed("the source download", hub_cache_dir(), _source_bytes(parameters, dtype)))
    if out_dir is not None:
        disk.append(DiskNeed("the output folders", Path(out_dir), sum(outputs)))
    peak = max((e.peak_ram_bytes for e in per_variant.values()), default=0)
    return RunEstimate(peak, disk, per_variant)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


# ------------------------------------------------------------------------------- the machine
def parse_bytes(text: str, name: str) -> int:
    """An environment variable's size: ``runners.parse_size``, as a UsageError naming the variable."""
    try:
        return parse_size(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a size: give bytes or a number with a unit, e.g. 24GB or 16GiB") \
            from None


def available_memory() -> int | None:
    """Memory a run can use now, in bytes; None when this system does not tell."""
    if os.environ.get(MEMORY_ENV):
        return parse_bytes(os.environ[MEMORY_ENV], MEMORY_ENV)
    if sys.platform.startswith("linux"):
        found = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
        return min(found) if found else None
    if sys.platform == "darwin":
        return _sysctl_memsize()
    return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest cgroup v2 limit on the way up from this process's group: memory.max minus the
    group's anonymous memory (page cache is reclaimable, as in MemAvailable)."""
    try:
        line = next(x for x in self_cgroup.read_text().splitlines() if x.startswith("0::"))
    except (OSError, StopIteration):
        return None
    group = root / line[3:].strip().lstrip("/")
    lowest = None
    for folder in [group, *group.parents]:
        if root not in (folder, *folder.parents):
            break
        try:
            limit = (folder / "memory.max").read_text().strip()
        except OSError:
            continue
        if limit != "max":
            free = int(limit) - _anon_bytes(folder / "memory.stat")
            lowest = free if lowest is None else min(lowest, free)
    return None if lowest is None else max(lowest, 0)


def _anon_bytes(stat: Path) -> int:
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "anon":
                return int(value)
    except OSError:
        pass
    return 0


def _sysctl_memsize() -> int | None:
    try:
        return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None


def free_disk(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or would, once created)."""
    if os.environ.get(DISK_ENV):
        return parse_bytes(os.environ[DISK_ENV], DISK_ENV)
    return shutil.disk_usage(existing_parent(path)).free


def existing_parent(path: Path) -> Path:
    """``path``, or its nearest parent that exists (where a folder yet to be made will be)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def same_disk(a: Path, b: Path) -> bool:
    return os.stat(existing_parent(a)).st_dev == os.stat(existing_parent(b)).st_dev


# ------------------------------------------------------------------------------- the check
def check(plan: Plan, parameters: int, dtype: str, *, variant_ids: Iterable[str] | None = None,
          workdir: Path | None = None, out_dir: Path | None = None, staged: bool = True,
          reference: bool = True) -> RunEstimate:
    """Raise PreflightError, naming what does not fit, when the run needs more RAM or disk than here."""
    run = estimate_run(plan, parameters, dtype, variant_ids=variant_ids, workdir=workdir, out_dir=out_dir,
                       staged=staged, reference=reference)
    memory = available_memory()
    too_big = [e for e in run.variants.values() if memory is not None and e.peak_ram_bytes > memory]
    short = _short_disks(run.disk)
    if too_big or short:
        raise PreflightError(_message(plan, run, too_big, memory, short))
    return run


def _short_disks(needs: list[DiskNeed]) -> list[tuple[list[DiskNeed], int]]:
    """Needs grouped by the disk they land on, with that disk's free bytes, where they exceed it."""
    groups: list[list[DiskNeed]] = []
    for need in (n for n in needs if n.bytes):
        group = next((g for g in groups if same_disk(g[0].path, need.path)), None)
        if group is None:
            groups.append([need])
        else:
            group.append(need)
    free = [(g, free_disk(g[0].path)) for g in groups]
    return [(g, f) for g, f in free if sum(n.bytes for n in g) > f]


def _message(plan: Plan, run: RunEstimate, too_big: list[Estimate], memory: int | None,
             short: list[tuple[list[DiskNeed], int]]) -> str:
    name = f"{plan.source.public_name} (recipe '{plan.recipe.name}')"
    lines = []
    if too_big:
        lines.append(f"preflight: {len(too_big)} of {len(run.variants)} variant(s) of {name} need more memory "
                     f"than the {human_size(memory)} available here:")
        reference = too_big[0].reference
        if reference.ram_bytes:
            lines.append(f"  validating any variant takes ~{human_size(reference.ram_bytes)} for {reference.what}, "
                         f"plus the variant in its runtime")
        lines += [f"  {e.variant_id}: {_needs(e)}" for e in too_big]
    for group, free in short:
        needed = " + ".join(f"{human_size(n.bytes)} for {n.what}" for n in group)
        lines.append(f"preflight: {name} needs {needed} on the disk of {group[0].path}, which has "
                     f"{human_size(free)} free")
    ways = []
    if too_big:
        ways.append(f"run on a machine with {human_size(max(e.peak_ram_bytes for e in too_big))} of memory")
        if len(too_big) < len(run.variants):
            ways.append("drop the variant(s) above from the recipe (or build the others one at a time with "
                        "`hubbot build --variant`)")
    if short:
        ways.append("put --workdir (and HF_HUB_CACHE / --out) on a bigger disk")
    ways.append(f"or skip this check with --no-preflight (the estimates lean high; {MEMORY_ENV} and "
                f"{DISK_ENV} override what this machine reports)")
    lines.append("To proceed: " + "; ".join(ways) + ".")
    return "\n".join(lines)


def _needs(e: Estimate) -> str:
    validation = f"validation ~{human_size(e.validation_ram_bytes)}"
    if e.runtime.ram_bytes:
        validation += f" (+ ~{human_size(e.runtime.ram_bytes)} for {e.runtime.what})"
    return f"build ~{human_size(e.build.ram_bytes)} ({e.build.what}); {validation}"


# ------------------------------------------------------------------------------- the source's size
def source_size(ref: SourceRef, api: Any = None) -> SourceSize:
    """Parameter count and dtype from safetensors headers, without downloading any weights. A local
    folder is checked first (``source_check``: headers, file sizes, shapes against config.json)."""
    if ref.is_local:
        from .source_check import check_folder

        check_folder(ref.path, ref.family, tokenizer=False)
        size = SourceSize.from_counts(parameters_by_dtype(ref.path))
        if size is None:
            raise SizeUnknown(f"{ref.path} has no *.safetensors weights")
        return size
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError

    from .hub import transport_failure, unreachable

    try:
        meta = api.get_safetensors_metadata(ref.repo_id, revision=ref.revision)
    except (HfHubHTTPError, NotASafetensorsRepoError, SafetensorsParsingError, OSError, httpx.HTTPError) as e:
        if transport_failure(e) is not None:  # no Hub, no run: say so now, not after "preflight skipped"
            raise unreachable(e, api.endpoint, f"read the safetensors headers of {ref.display}") from None
        raise SizeUnknown(f"cannot read the safetensors headers of {ref.display} ({type(e).__name__})") from None
    size = SourceSize.from_counts(meta.parameter_count)
    if size is None:
        raise SizeUnknown(f"{ref.display} has no parameters in its safetensors headers")
    return size


def check_source(ref: SourceRef, recipe: Recipe, api: Any, *, variant_ids: Iterable[str] | None = None,
                 workdir: Path | None = None, out_dir: Path | None = None, staged: bool = True,
                 reference: bool = True, log: Log = print, size: SourceSize | None = None) -> RunEstimate | None:
    """The preflight of ``hubbot publish`` and ``hubbot build``: size the source from its headers
    (unless ``size`` is given), then ``check``. A source whose size cannot be read is not refused here
    (the download says why)."""
    try:
        size = size or source_size(ref, api)
    except SizeUnknown as e:
        log(f"preflight skipped: {e}")
        return None
    plan = make_plan(ref, recipe, size.parameters, read_config(ref.path) if ref.is_local else None)
    run = check(plan, size.parameters, size.dtype, variant_ids=variant_ids, workdir=workdir, out_dir=out_dir,
                staged=staged, reference=reference)
    memory = available_memory()
    log(f"preflight: {human_count(size.parameters)} parameters ({size.dtype}); peak RAM "
        f"~{human_size(run.peak_ram_bytes)} of {human_size(memory)} available, disk ~{human_size(run.disk_bytes)}")
    return run


def check_dropped(ref: SourceRef, recipe: Recipe, api: Any, *, variant_ids: Iterable[str] | None = None,
                  log: Log = print) -> SourceSize | None:
    """Size the source and refuse (exit 2), before anything is downloaded or built, a named variant
    the sized plan drops (e.g. its weights file would be over the Hub's per-file limit). Not part
    of the memory/disk preflight: ``--no-preflight`` does not skip it. Returns the source's size for
    ``check_source`` (None when it cannot be read)."""
    try:
        size = source_size(ref, api)
    except SizeUnknown as e:
        log(f"the source's size is unknown before the download: {e}")
        return None
    plan = make_plan(ref, recipe, size.parameters, read_config(ref.path) if ref.is_local else None)
    wanted = set(variant_ids) if variant_ids is not None else set()
    for d in plan.dropped:
        if d.id in wanted:
            raise UsageError(f"{d.id} cannot be built for {ref.public_name}: {d.reason}")
    return size


def human_count(n: int) -> str:
    """14.66B, 2.2M, 800."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def machine(workdir: Path | None = None) -> dict[str, Any]:
    """What ``plan --json`` reports about this machine."""
    path = Path(workdir or tempfile.gettempdir())
    return {"available_memory_bytes": available_memory(), "free_disk_bytes": free_disk(path),
            "disk_path": str(path)}

