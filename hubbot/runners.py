"""Runner routing for a fanned-out publish: each variant's build job goes to the smallest runner
class whose memory and disk cover the preflight's estimate for it.

Runner classes are declared per family in its recipe file (``runners:``; GitHub's hosted
``ubuntu-latest`` — 16 GB RAM, ~14 GB free disk — when a family declares none). ``hubbot plan
--github-matrix`` writes the chosen class's ``runs-on`` into each matrix entry and refuses (exit 2)
a variant no class can hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """``25769803776``, ``24GB`` (10^9), ``24GiB`` (2^30), ``512M``; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a size: give bytes or a number with a unit, e.g. 16GB or 64GiB")
    return int(float(m[1]) * UNITS[(m[2] or "").lower()])


@dataclass(frozen=True)
class RunnerClass:
    name: str
    runs_on: str | tuple[str, ...]  # what a job's `runs-on:` gets: a label or a list of labels
    memory_bytes: int
    disk_bytes: int  # free disk a job gets
    free_disk: bool = False  # the job first deletes the hosted image's preinstalled SDKs (publish.yml's step)

    def labels(self) -> str | list[str]:
        return self.runs_on if isinstance(self.runs_on, str) else list(self.runs_on)

    def fits(self, ram_bytes: int, disk_bytes: int) -> bool:
        return ram_bytes <= self.memory_bytes and disk_bytes <= self.disk_bytes


HOSTED = RunnerClass("default", "ubuntu-latest", 16 * 10**9, 14 * 10**9)


def smallest_first(classes: Iterable[RunnerClass]) -> list[RunnerClass]:
    return sorted(classes, key=lambda c: (c.memory_bytes, c.disk_bytes))


@dataclass(frozen=True)
class Routed:
    variant_id: str
    runner: RunnerClass
    ram_bytes: int | None  # None: the source's size is unknown, so it goes to the smallest class
    disk_bytes: int | None


def route(needs: dict[str, tuple[int, int] | None], classes: Sequence[RunnerClass]) -> list[Routed]:
    """``needs``: variant id -> (peak RAM, disk) or None when unknown. Raises UsageError for a
    variant that no class can hold, naming what it needs and what the biggest class offers."""
    from .card import human_size

    ordered = smallest_first(classes)
    routed, too_big = [], []
    for variant_id, need in needs.items():
        if need is None:
            routed.append(Routed(variant_id, ordered[0], None, None))
            continue
        ram, disk = need
        chosen = next((c for c in ordered if c.fits(ram, disk)), None)
        if chosen is None:
            too_big.append(f"{variant_id} needs ~{human_size(ram)} RAM and ~{human_size(disk)} disk")
            continue
        routed.append(Routed(variant_id, chosen, ram, disk))
    if too_big:
        biggest = max(ordered, key=lambda c: (c.memory_bytes, c.disk_bytes))
        raise UsageError(f"no runner class can build {'; '.join(too_big)} (the biggest, '{biggest.name}', has "
                         f"{human_size(biggest.memory_bytes)} RAM and {human_size(biggest.disk_bytes)} disk); "
                         f"add a bigger class under `runners:` in the recipe file, or drop the variant")
    return routed


def matrix_entry(routed: Routed, base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "runner": routed.runner.name, "runs_on": routed.runner.labels(),
            "free_disk": routed.runner.free_disk,
            "estimated_peak_ram_bytes": routed.ram_bytes, "estimated_disk_bytes": routed.disk_bytes}
