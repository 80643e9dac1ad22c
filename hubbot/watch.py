"""watch: find new releases of each family on the Hub and publish them with the default recipe.

One pass (``watch_once``) lists each family's authors' models through the injected ``HfApi``
(newest change first), keeps those matching the family's models or watch patterns, and for each
(repo, upstream sha) the ledger has not finished: checks it can be read (gated, private and
disabled repos are recorded as skipped, with the reason), claims it in the ledger, and runs the
ordinary pipeline (``select`` → ``prepare`` → ``Publisher``) pinned to that sha. The ledger
records the outcome and every variant; the Hub manifest makes a rebuild of something already
published a no-op even when the ledger was lost.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import HubbotError, UnsupportedSource, UsageError
from .hub import reaching
from .ledger import Ledger
from .pipeline import Publisher, RepoOutcome, failure_reason, prepare, select
from .plan import Dropped, make_plan
from .recipe import Family
from .secrets import redact

Log = Callable[[str], None]


@dataclass(frozen=True)
class ListedRelease:
    """One model on the Hub at one commit, as listed."""

    repo: str
    sha: str
    family: str
    created_at: datetime | None = None
    last_modified: datetime | None = None
    gated: Any = False  # False | "auto" | "manual"
    private: bool = False
    disabled: bool = False


@dataclass
class ReleaseResult:
    release: ListedRelease
    status: str  # published | partial | up-to-date | failed | skipped | unsupported | known | claimed-elsewhere
    reason: str = ""
    outcomes: list[RepoOutcome] = field(default_factory=list)

    @property
    def where(self) -> str:
        if self.outcomes:
            return ", ".join(f"{o.repo_id} ({o.status}" + (f": {o.summary})" if o.status == "failed" and o.message
                                                          else ")") for o in self.outcomes)
        return self.reason


LIST_FIELDS = ["sha", "createdAt", "lastModified", "gated", "private", "disabled"]


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def find_releases(api, families: Iterable[Family], since: datetime | None = None) -> list[ListedRelease]:
    """Every model of the families' authors that the family claims, newest change first."""
    since = _aware(since)
    found: dict[str, ListedRelease] = {}
    for fam in families:
        authors = list(dict.fromkeys(list(fam.authors) + [m.repo.split("/")[0] for m in fam.models.values()]))
        for author in authors:
            for info in api.list_models(author=author, sort="last_modified", expand=LIST_FIELDS):
                modified = _aware(getattr(info, "last_modified", None))
                if since and modified and modified < since:
                    break  # sorted newest first: everything after this is older
                if info.id in found or not fam.matches_repo(info.id) or not info.sha:
                    continue
                found[info.id] = ListedRelease(
                    info.id, info.sha, fam.name, _aware(getattr(info, "created_at", None)), modified,
                    getattr(info, "gated", False) or False, bool(getattr(info, "private", False)),
                    bool(getattr(info, "disabled", False)))
    return sorted(found.values(), key=lambda r: (r.last_modified or datetime.min.replace(tzinfo=timezone.utc)),
                  reverse=True)


def read_release_config(api, release: ListedRelease) -> tuple[dict[str, Any] | None, str | None]:
    """The release's config.json (None when it has none the build could use: the build says why),
    or why the token cannot read the release: one download, which also tells whether a gated repo
    lets the token in."""
    from huggingface_hub.errors import DisabledRepoError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if release.disabled:
        return None, "disabled on the Hub"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = api.hf_hub_download(release.repo, "config.json", revision=release.sha, local_dir=tmp)
            return json.loads(Path(path).read_text()), None
    except GatedRepoError:
        return None, f"gated ({release.gated}): the token has no access; request it on the repo's Hub page"
    except DisabledRepoError:
        return None, "disabled on the Hub"
    except RepositoryNotFoundError:
        return None, "private or deleted: the token cannot read it"
    except HfHubHTTPError as e:
        if not release.gated:
            return None, None  # a public release: its build retries and reports what the Hub answers
        status = e.response.status_code if e.response is not None else "?"
        return None, f"cannot read it (HTTP {status})"
    except (OSError, ValueError):  # no config.json, or not JSON: the build says what is wrong with it
        return None, None


def update_collection(api, namespace: str, source_repo: str, repo_ids: list[str]) -> str:
    """Create (or find) the release's collection in ``namespace`` and make sure it holds every repo."""
    name = source_repo.split("/")[1]
    collection = api.create_collection(
        title=f"{name} quantized"[:59], namespace=namespace, exists_ok=True,
        description=f"Quantized variants of {source_repo}, built and validated by hubbot"[:150])
    present = {item.item_id for item in collection.items}
    for repo_id in repo_ids:
        if repo_id not in present:
            api.add_collection_item(collection.slug, repo_id, "model", exists_ok=True)
    return collection.slug


def _release_status(outcomes: list[RepoOutcome]) -> str:
    statuses = {o.status for o in outcomes}
    if "failed" in statuses:
        return "failed"
    if "published" in statuses:
        return "published"
    return "up-to-date"


class Watcher:
    def __init__(self, api, families: dict[str, Family], ledger: Ledger, target, *, recipe: str | None = None,
                 log: Log = print, max_attempts: int = 3, workdir: Path | None = None,
                 on_release: Callable[[ListedRelease], Any] | None = None, collections: bool = True):
        self.api = api
        self.families = families
        self.ledger = ledger
        self.target = target
        self.recipe = recipe
        self.log = log
        self.max_attempts = max_attempts
        self.workdir = workdir
        self.on_release = on_release  # e.g. an Actions log group around each build
        self.collections = collections

    def check_recipe(self) -> None:
        """Fail fast (exit 2) on a --recipe some watched family does not have."""
        if self.recipe:
            for fam in self.families.values():
                fam.recipe(self.recipe)

    def once(self, since: datetime | None = None) -> list[ReleaseResult]:
        with reaching(self.api.endpoint, "watch"):  # listing, or checking a release can be read
            releases = find_releases(self.api, self.families.values(), since)
            self.log(f"{len(releases)} release(s) of {', '.join(self.families)} on {self.api.endpoint}")
            return [self.handle(r) for r in releases]

    def handle(self, release: ListedRelease) -> ReleaseResult:
        fam = self.families[release.family]
        recipe = self.recipe or fam.default_recipe
        created = release.created_at.strftime("%Y-%m-%dT%H:%M:%SZ") if release.created_at else None
        known = self.ledger.get(release.repo, release.sha)
        if not self.ledger.should_try(known, self.max_attempts):
            return ReleaseResult(release, "known", f"{known.status} (ledger)")
        config, reason = read_release_config(self.api, release)
        if reason:
            if self.ledger.skip(release.repo, release.sha, fam.name, created, reason):
                self.log(f"{release.repo}: skipped — {reason}")
            return ReleaseResult(release, "skipped", reason)
        reason = self.unsupported(release, recipe, config)
        if reason:
            return self._unsupported(release, fam.name, created, reason)
        if not self.ledger.claim(release.repo, release.sha, fam.name, recipe, created, self.max_attempts):
            return ReleaseResult(release, "claimed-elsewhere", "another watcher has it")
        self.log(f"{release.repo}@{release.sha[:12]}: new release; building recipe '{recipe}'")
        try:
            if self.on_release:
                with self.on_release(release):
                    outcomes, dropped = self._build(release, recipe)
            else:
                outcomes, dropped = self._build(release, recipe)
        except UnsupportedSource as e:  # its downloaded config said more than config.json alone
            return self._unsupported(release, fam.name, created, str(e))
        except HubbotError as e:
            return self._fail(release, str(e))
        except Exception as e:  # noqa: BLE001 - one broken release must not stop the others
            return self._fail(release, failure_reason(e))
        except BaseException:  # interrupted (Ctrl-C, a cancelled job): free the claim for the next pass
            self.ledger.finish(release.repo, release.sha, "failed", "interrupted")
            raise
        status = _release_status(outcomes)
        reason = "; ".join(f"{o.repo_id}: {o.message}" for o in outcomes if o.message)
        if dropped and status == "published":
            status = "partial"
            reason = "; ".join(filter(None, [reason, "dropped " + ", ".join(f"{d.id} ({d.reason})" for d in dropped)]))
        collection = None
        done = [o.repo_id for o in outcomes if o.status != "failed"]
        if self.collections and done:
            try:
                collection = update_collection(self.api, self.target.namespace, release.repo, done)
                self.log(f"{release.repo}: collection {self.api.endpoint}/collections/{collection}")
            except Exception as e:  # noqa: BLE001 - the variants are published; the collection is a bonus
                reason = "; ".join(filter(None, [reason, f"collection not updated: {type(e).__name__}"]))
                self.log(f"{release.repo}: could not update its collection ({type(e).__name__}: {e})")
        self.ledger.finish(release.repo, release.sha, status, reason, collection=collection)
        return ReleaseResult(release, status, reason, outcomes)

    def unsupported(self, release: ListedRelease, recipe: str, config: dict[str, Any] | None) -> str | None:
        """Why nothing of the release can be built, from its config.json alone (before any download)."""
        if config is None:
            return None
        try:
            ref, the_recipe = select(f"{release.repo}@{release.sha}", recipe, self.families, release.family)
        except HubbotError:  # the build says what is wrong with it
            return None
        return make_plan(ref, the_recipe, config=config).unsupported

    def _unsupported(self, release: ListedRelease, family: str, created: str | None, reason: str) -> ReleaseResult:
        reason = reason if reason.startswith("nothing of") else f"nothing of it can be built: {reason}"
        if self.ledger.skip(release.repo, release.sha, family, created, reason, status="unsupported"):
            self.log(f"{release.repo}@{release.sha[:12]}: unsupported — {reason}")
        return ReleaseResult(release, "unsupported", reason)

    def _fail(self, release: ListedRelease, reason: str) -> ReleaseResult:
        # a local snapshot path says nothing to a reader of the ledger: name the release instead
        reason = re.sub(r"\S*/snapshots/[0-9a-f]{40}", f"{release.repo}@{release.sha[:12]}", redact(reason))
        self.log(f"{release.repo}@{release.sha[:12]}: FAILED — {reason}")
        self.ledger.finish(release.repo, release.sha, "failed", reason)
        return ReleaseResult(release, "failed", reason)

    def _build(self, release: ListedRelease, recipe: str) -> tuple[list[RepoOutcome], list[Dropped]]:
        ref, the_recipe = select(f"{release.repo}@{release.sha}", recipe, self.families, release.family)
        plan, snapshot = prepare(ref, the_recipe, self.api)
        if snapshot.commit != release.sha:
            raise UsageError(f"{release.repo}: asked for {release.sha}, got {snapshot.commit}")
        for d in plan.dropped:
            self.ledger.record_variant(release.repo, release.sha, d.id, f"{self.target.namespace}/{d.repo}", "dropped",
                                       reason=d.reason)
        outcomes = Publisher(self.target, log=self.log, workdir=self.workdir).run(plan, snapshot)
        by_repo = {r.repo_id(self.target.namespace): r for r in plan.repos}
        for o in outcomes:
            # a failed repo was not committed: it has no commit of this build to point at
            commit = o.push.commit if o.push else None if o.status == "failed" else self._head(o.repo_id)
            if o.reports:
                for rep in o.reports:
                    self.ledger.record_variant(release.repo, release.sha, rep["variant_id"], o.repo_id, o.status,
                                               passed=rep["passed"], agreement=rep["agreement"],
                                               threshold=rep["threshold"], commit_sha=commit)
            else:  # up to date (the Hub already has exactly this build), or failed before any report
                for v in by_repo[o.repo_id].variants:
                    self.ledger.record_variant(release.repo, release.sha, v.id, o.repo_id, o.status,
                                               threshold=v.min_agreement, commit_sha=commit)
        return outcomes, plan.dropped

    def _head(self, repo_id: str) -> str | None:
        try:
            return self.api.model_info(repo_id).sha
        except Exception:  # noqa: BLE001 - only informative
            return None
