"""Drives tests/hubserver.FakeHub with the real huggingface_hub client (no mocks).

Tests that upload or download LFS files take the `transfer` fixture (conftest): they run once with
the client uploading through Xet (its default, hf_xet installed) and once through LFS."""
import hashlib
import json
import os
import time
from datetime import datetime, timezone

import httpx
import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from tests.hubserver import FakeHub

ALICE, BOB = "hf_alice_token", "hf_bob_token"
AUTH = {"Authorization": f"Bearer {ALICE}"}
BIG = 10 * 1024 * 1024 + 17  # over the regular-file limit: LFS by size even though it is text


@pytest.fixture(autouse=True)
def _client_env(monkeypatch, tmp_path):
    # huggingface_hub reads these at import time: set the env for anything imported later, patch the constants
    for name, value in (("HF_HUB_DISABLE_XET", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HOME", str(tmp_path))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield
    if not bars_were_off:
        enable_progress_bars()


@pytest.fixture
def hub():
    with FakeHub(users={"alice": ALICE, "bob": BOB}, orgs={"alice": ["phi-org"]}) as hub:
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama"}',
        "README.md": b"---\nlicense: apache-2.0\npipeline_tag: text-generation\ntags:\n- quantized\n---\n# Tiny\n",
        "sub/notes.txt": b"regular text file\n",
        "model.safetensors": b"{}" + bytes(range(256)) * 4,   # LFS by extension
        "sub/blob.dat": b"\x00\x01\x02 binary without an LFS extension",  # LFS by content
        "big.txt": b"a" * BIG,                                   # LFS by size
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d, files


def puts(hub):
    return [r for r in hub.requests if r[0] == "PUT"]


def cas_calls(hub, route: str):
    return [r for r in hub.requests if r[1].startswith(f"/cas/v1/{route}")]


def test_whoami_and_create_repo(hub, api):
    me = api.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["phi-org"]
    url = api.create_repo("alice/x")
    assert url.repo_id == "alice/x" and url == f"{hub.url}/alice/x"
    assert api.create_repo("alice/x", exist_ok=True).repo_id == "alice/x"
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/x")
    assert e.value.response.status_code == 409
    assert api.create_repo("phi-org/y").repo_id == "phi-org/y"
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("bob/z")
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.url, token="hf_wrong").whoami()
    assert e.value.response.status_code == 401
    # the Hub creates every repo with an initial commit holding .gitattributes
    assert [c.title for c in hub.commits("alice/x")] == ["initial commit"]
    assert api.list_repo_files("alice/x") == [".gitattributes"]
    api.delete_repo("alice/x")
    assert not hub.repo_exists("alice/x") and hub.repo_exists("phi-org/y")


def test_upload_folder_regular_and_lfs(hub, api, folder, transfer):
    d, files = folder
    api.create_repo("alice/m")
    hub.reset_counters()
    info = api.upload_folder(repo_id="alice/m", folder_path=d, commit_message="Add model")
    assert info.oid == hub.commits("alice/m")[-1].oid
    assert hub.files("alice/m") == {".gitattributes": hub.files("alice/m")[".gitattributes"], **files}
    lfs = {"model.safetensors", "sub/blob.dat", "big.txt"}
    regular_bytes = sum(len(v) for k, v in files.items() if k not in lfs)
    if transfer == "lfs":
        assert len(puts(hub)) == len(lfs) and all(status == 200 for _, _, status in puts(hub))
        assert hub.bytes_uploaded == sum(len(v) for v in files.values()) and hub.xet_files("alice/m") == {}
    else:  # the LFS files went to the CAS as xorbs (big.txt compresses well), none through LFS
        assert puts(hub) == [] and not [r for r in hub.requests if "/info/lfs/" in r[1]]
        assert set(hub.xet_files("alice/m")) == lfs and cas_calls(hub, "shards")[-1][2] == 200
        assert 0 < hub.cas.xorb_bytes_received < sum(len(files[p]) for p in lfs)
        assert hub.bytes_uploaded == hub.cas.xorb_bytes_received + regular_bytes
    assert sorted(api.list_repo_files("alice/m")) == sorted([".gitattributes", *files])
    siblings = {s.rfilename: s for s in api.model_info("alice/m", files_metadata=True).siblings}
    for name, data in files.items():
        assert siblings[name].size == len(data)
        assert (siblings[name].lfs is not None) == (name in lfs)
    assert siblings["big.txt"].lfs.sha256 == hashlib.sha256(files["big.txt"]).hexdigest()
    # like the Hub, sizes only come with files_metadata=True
    assert api.model_info("alice/m").siblings[0].size is None
    card = api.model_info("alice/m")
    assert card.card_data["license"] == "apache-2.0" and card.pipeline_tag == "text-generation"
    assert "license:apache-2.0" in card.tags and "quantized" in card.tags and card.library_name == "transformers"


def test_downloads_match_uploads(hub, api, folder, tmp_path, transfer):
    d, files = folder
    api.create_repo("alice/m")
    sha = api.upload_folder(repo_id="alice/m", folder_path=d).oid
    hub.reset_counters()
    for name in ("big.txt", "sub/notes.txt", "model.safetensors"):
        path = api.hf_hub_download("alice/m", name, cache_dir=tmp_path / "c1")
        assert open(path, "rb").read() == files[name]
    body_gets = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    if transfer == "xet":  # LFS files came from the CAS (reconstruction + signed xorb ranges), not /resolve
        assert body_gets == {"notes.txt"} and len(cas_calls(hub, "reconstructions")) == 2
        assert hub.cas.xorb_bytes_served > 0
    else:
        assert body_gets == {"big.txt", "notes.txt", "model.safetensors"} and hub.cas.xorb_bytes_served == 0
    snap = api.snapshot_download("alice/m", cache_dir=tmp_path / "c2")
    assert snap.endswith(sha)
    for name, data in files.items():
        assert (tmp_path / "c2" / snap / name).read_bytes() == data
    with pytest.raises(RemoteEntryNotFoundError):
        api.hf_hub_download("alice/m", "nope.txt", cache_dir=tmp_path / "c3")
    with pytest.raises(RevisionNotFoundError):
        api.hf_hub_download("alice/m", "config.json", revision="nope", cache_dir=tmp_path / "c3")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nothing")
    # Range and the headers the client reads
    r = httpx.get(f"{hub.url}/alice/m/resolve/main/big.txt", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == files["big.txt"][10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{BIG}" and r.headers["X-Repo-Commit"] == sha
    head = httpx.head(f"{hub.url}/alice/m/resolve/main/big.txt")
    assert head.headers["X-Linked-Size"] == str(BIG) and head.headers["X-Linked-Etag"].strip('"') == \
        hashlib.sha256(files["big.txt"]).hexdigest()
    assert head.headers.get("X-Xet-Hash") == hub.xet_files("alice/m").get("big.txt")  # None through LFS


def test_identical_second_upload_is_a_no_op(hub, api, folder, transfer):
    d, _ = folder
    api.create_repo("alice/m")
    first = api.upload_folder(repo_id="alice/m", folder_path=d)
    assert (hub.cas.xorbs_received > 0) == (transfer == "xet")
    hub.reset_counters()
    second = api.upload_folder(repo_id="alice/m", folder_path=d)
    assert second.oid == first.oid and len(hub.commits("alice/m")) == 2
    assert hub.bytes_uploaded == 0 and puts(hub) == [] and cas_calls(hub, "xorbs") == []
    assert not any("/commit/" in path for _, path, _ in hub.requests)
    assert ("GET", "/api/models/alice/m/revision/main", 200) in hub.requests


def test_create_pr_then_merge(hub, api, transfer):
    api.create_repo("alice/m")
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"v1", path_in_repo="a.txt")
    main_before = hub.files("alice/m")
    ops = [CommitOperationAdd("a.txt", b"v2"), CommitOperationAdd("w.safetensors", b"\x00weights")]
    info = api.create_commit("alice/m", ops, commit_message="Quantize", create_pr=True)
    assert info.pr_url == f"{hub.url}/alice/m/discussions/1" and info.pr_revision == "refs/pr/1"
    assert hub.files("alice/m") == main_before  # main untouched
    (pr,) = hub.pull_requests("alice/m")
    assert (pr.num, pr.ref, pr.status, pr.files["a.txt"]) == (1, "refs/pr/1", "draft", b"v2")
    refs = api.list_repo_refs("alice/m", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", info.oid)]
    details = api.get_discussion_details("alice/m", 1)
    assert details.is_pull_request and details.target_branch == "refs/heads/main" and details.status == "draft"
    assert "a.txt" in details.diff and details.conflicting_files == []
    assert api.file_exists("alice/m", "w.safetensors", revision="refs/pr/1")
    assert not api.file_exists("alice/m", "w.safetensors")
    api.comment_discussion("alice/m", 1, "looks good")
    api.merge_pull_request("alice/m", 1)
    assert hub.files("alice/m")["a.txt"] == b"v2" and hub.files("alice/m")["w.safetensors"] == b"\x00weights"
    assert hub.pull_requests("alice/m")[0].status == "merged"
    assert ("w.safetensors" in hub.xet_files("alice/m")) == (transfer == "xet")
    assert api.get_discussion_details("alice/m", 1).merge_commit_oid == hub.commits("alice/m")[-1].oid
    assert hub.commits("alice/m")[-1].title == "Quantize (#1)"


def test_failed_commit_leaves_repo_unchanged_and_retry_succeeds(hub, api, tmp_path, transfer):
    api.create_repo("alice/m")
    before = [c.oid for c in hub.commits("alice/m")]
    (tmp_path / "w.gguf").write_bytes(b"GGUF" + bytes(4096))
    ops = [CommitOperationAdd("w.gguf", tmp_path / "w.gguf"), CommitOperationAdd("README.md", b"# card\n")]
    hub.inject(method="POST", path=r"/api/models/.+/commit/", status=500, times=1)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit("alice/m", ops, commit_message="Add gguf")
    assert e.value.response.status_code == 500
    assert [c.oid for c in hub.commits("alice/m")] == before and set(hub.files("alice/m")) == {".gitattributes"}
    assert [s for m, p, s in hub.requests if "/commit/" in p] == [500]  # the client does not retry a commit
    # retrying the same operations skips the LFS upload (already done) and lands everything
    info = api.create_commit("alice/m", ops, commit_message="Add gguf")
    assert hub.files("alice/m")["w.gguf"] == b"GGUF" + bytes(4096) and info.oid == hub.commits("alice/m")[-1].oid
    assert len(puts(hub)) == (1 if transfer == "lfs" else 0)
    assert hub.cas.xorbs_received == (1 if transfer == "xet" else 0)
    # a commit failing on its last operation lands none of the earlier ones
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/m", [CommitOperationAdd("new.txt", b"n"), CommitOperationDelete("missing.txt")],
                          commit_message="half")
    assert "new.txt" not in hub.files("alice/m") and len(hub.commits("alice/m")) == len(before) + 1
    # a stale parent commit is refused (412) and changes nothing
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit("alice/m", [CommitOperationDelete("README.md")], commit_message="rm", parent_commit=before[0])
    assert e.value.response.status_code == 412 and "README.md" in hub.files("alice/m")


def test_lost_commit_response_still_lands(hub, api):
    api.create_repo("alice/m")
    hub.inject(method="POST", path=r"/commit/", status=502, after=True)
    with pytest.raises(HfHubHTTPError):
        api.upload_file(repo_id="alice/m", path_or_fileobj=b"x", path_in_repo="x.txt")
    assert hub.files("alice/m")["x.txt"] == b"x"


def test_preupload_429_is_retried_by_the_client(hub, api):
    api.create_repo("alice/m")
    hub.reset_counters()
    hub.inject(method="POST", path=r"/preupload/", status=429, retry_after=0, times=2)
    start = time.monotonic()
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"hello", path_in_repo="h.txt")
    assert [s for m, p, s in hub.requests if "/preupload/" in p] == [429, 429, 200]
    # the client reads the RateLimit header (not Retry-After) and sleeps t + 1 s per retry
    assert time.monotonic() - start >= 2
    assert hub.files("alice/m")["h.txt"] == b"hello"
    hub.inject(method="GET", path=r"/api/whoami-v2", status=429, retry_after=7)
    r = httpx.get(f"{hub.url}/api/whoami-v2")
    assert r.status_code == 429 and r.headers["Retry-After"] == "7" and r.headers["RateLimit"] == '"api";r=0;t=7'


def test_dropped_lfs_put_is_retried(hub, api, tmp_path):
    api.create_repo("alice/m")
    data = os.urandom(300_000)
    (tmp_path / "w.bin").write_bytes(data)
    hub.reset_counters()
    hub.inject(method="PUT", path=r"/lfs-upload/", drop=True, times=1)
    api.upload_file(repo_id="alice/m", path_or_fileobj=tmp_path / "w.bin", path_in_repo="w.bin")
    assert [s for _, _, s in puts(hub)] == [0, 200]  # 0 = connection closed without an answer
    assert hub.files("alice/m")["w.bin"] == data and hub.bytes_uploaded == len(data)


def test_fault_skip_and_clear(hub, api):
    api.create_repo("alice/m")
    hub.inject(method="POST", path=r"/commit/", status=500, skip=1, times=1)
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"1", path_in_repo="1.txt")
    with pytest.raises(HfHubHTTPError):
        api.upload_file(repo_id="alice/m", path_or_fileobj=b"2", path_in_repo="2.txt")
    hub.inject(method="POST", path=r"/commit/", status=500, times=5)
    hub.clear_faults()
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"3", path_in_repo="3.txt")
    assert sorted(hub.files("alice/m")) == [".gitattributes", "1.txt", "3.txt"]


def test_private_repo_is_invisible_to_others(hub, api, tmp_path):
    api.create_repo("alice/secret", private=True)
    api.upload_file(repo_id="alice/secret", path_or_fileobj=b"s", path_in_repo="s.txt")
    bob, anon = HfApi(endpoint=hub.url, token=BOB), HfApi(endpoint=hub.url, token=False)
    for other in (bob, anon):
        with pytest.raises(RepositoryNotFoundError):
            other.model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            other.hf_hub_download("alice/secret", "s.txt", cache_dir=tmp_path / "c")
        assert not other.repo_exists("alice/secret")
        assert [m.id for m in other.list_models(author="alice")] == []
    with pytest.raises(HfHubHTTPError):
        bob.upload_file(repo_id="alice/secret", path_or_fileobj=b"x", path_in_repo="x.txt")
    assert api.model_info("alice/secret").private is True
    assert [m.id for m in api.list_models(author="alice")] == ["alice/secret"]
    api.update_repo_settings("alice/secret", private=False)
    assert bob.model_info("alice/secret").private is False


def test_gated_repo_needs_access_to_download(hub, tmp_path):
    hub.seed_repo("meta/gated", {"config.json": b"{}"}, gated="manual")
    bob = HfApi(endpoint=hub.url, token=BOB)
    assert bob.model_info("meta/gated").gated == "manual"
    with pytest.raises(GatedRepoError):
        bob.hf_hub_download("meta/gated", "config.json", cache_dir=tmp_path / "c")
    hub.grant_access("meta/gated", "bob")
    assert open(bob.hf_hub_download("meta/gated", "config.json", cache_dir=tmp_path / "c"), "rb").read() == b"{}"


def test_list_models_by_author_with_paging(tmp_path):
    with FakeHub(users={"alice": ALICE}, page_size=2) as hub:
        for i in range(5):
            hub.seed_repo(f"microsoft/m{i}", {"config.json": b"{}"},
                          created_at=datetime(2025, 1, 1 + i, tzinfo=timezone.utc), tags=["phi"] if i % 2 else [])
        hub.seed_repo("other/m9", {"config.json": b"{}"})
        api = HfApi(endpoint=hub.url, token=ALICE)
        hub.reset_counters()
        models = list(api.list_models(author="microsoft", sort="created_at", full=True))
        assert [m.id for m in models] == [f"microsoft/m{i}" for i in (4, 3, 2, 1, 0)]
        assert len(hub.requests) == 3 and "cursor=" in hub.requests[-1][1]
        assert models[0].sha == hub.commits("microsoft/m4")[-1].oid and models[0].siblings
        assert models[0].created_at == datetime(2025, 1, 5, tzinfo=timezone.utc)
        assert [m.id for m in api.list_models(author="microsoft", filter="phi")] == ["microsoft/m3", "microsoft/m1"]
        assert [m.id for m in api.list_models(search="m9")] == ["other/m9"]
        hub.reset_counters()
        assert len(list(api.list_models(author="microsoft", limit=2))) == 2 and len(hub.requests) == 1


def test_collections(hub, api):
    hub.seed_repo("alice/q1", {"config.json": b"{}"})
    c = api.create_collection("Phi quants", description="all of them")
    assert c.slug.startswith("alice/phi-quants-") and c.owner["name"] == "alice" and c.items == []
    assert api.create_collection("Phi quants", exists_ok=True).slug == c.slug
    with pytest.raises(HfHubHTTPError) as e:
        api.create_collection("Phi quants")
    assert e.value.response.status_code == 409
    c = api.add_collection_item(c.slug, "alice/q1", "model", note="4-bit")
    assert [(i.item_id, i.item_type, i.note, i.position) for i in c.items] == [("alice/q1", "model", "4-bit", 0)]
    assert api.add_collection_item(c.slug, "alice/q1", "model", exists_ok=True).slug == c.slug
    with pytest.raises(HfHubHTTPError):
        api.add_collection_item(c.slug, "alice/missing", "model")
    assert [i.item_id for i in api.get_collection(c.slug).items] == ["alice/q1"]
    private = api.create_collection("hidden", private=True, namespace="phi-org")
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.url, token=BOB).get_collection(private.slug)


def test_branches_tags_history_and_tree(hub, api):
    api.create_repo("alice/m")
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"1", path_in_repo="d/a.txt", commit_message="one")
    api.upload_file(repo_id="alice/m", path_or_fileobj=b"2", path_in_repo="b.txt", commit_message="two")
    api.create_branch("alice/m", branch="dev")
    api.create_tag("alice/m", tag="v1", revision="main")
    with pytest.raises(HfHubHTTPError):
        api.create_tag("alice/m", tag="v1")
    api.create_commit("alice/m", [CommitOperationDelete("d/")], commit_message="rm d", revision="dev")
    refs = api.list_repo_refs("alice/m")
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert sorted(hub.files("alice/m", revision="dev")) == [".gitattributes", "b.txt"]
    assert sorted(hub.files("alice/m", revision="v1")) == [".gitattributes", "b.txt", "d/a.txt"]
    assert [c.title for c in api.list_repo_commits("alice/m")] == ["two", "one", "initial commit"]
    tree = {e.path: e for e in api.list_repo_tree("alice/m", recursive=True, expand=True)}
    assert set(tree) == {".gitattributes", "b.txt", "d", "d/a.txt"}
    assert tree["d/a.txt"].last_commit.title == "one" and tree["b.txt"].last_commit.title == "two"
    assert [e.path for e in api.list_repo_tree("alice/m")] == ["d", ".gitattributes", "b.txt"]
    info = api.get_paths_info("alice/m", ["b.txt", "d", "missing"])
    assert [(type(e).__name__, e.path) for e in info] == [("RepoFile", "b.txt"), ("RepoFolder", "d")]
    api.delete_tag("alice/m", tag="v1")
    api.delete_branch("alice/m", branch="dev")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/m", revision="dev")


def test_lfs_objects_belong_to_the_repo_they_were_uploaded_to(hub, api, tmp_path, transfer):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(100_000))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    for repo in ("alice/a", "alice/b", "alice/c"):
        api.create_repo(repo)
    api.upload_file(repo_id="alice/a", path_or_fileobj=weights, path_in_repo="w.safetensors")
    hub.reset_counters()
    api.upload_file(repo_id="alice/b", path_or_fileobj=weights, path_in_repo="w.safetensors")
    assert hub.files("alice/b")["w.safetensors"] == weights.read_bytes()
    if transfer == "lfs":  # b's batch asked for the object again, though a holds it
        assert len(puts(hub)) == 1 and hub.bytes_uploaded == 100_000
    else:  # Xet may spare the bytes (deduplication spans repos) but the file must be registered for b
        assert hub.cas.files_registered == [(("model", "alice/b"), hub.xet_files("alice/b")["w.safetensors"])]

    def batch(repo):
        r = httpx.post(f"{hub.url}/{repo}.git/info/lfs/objects/batch", headers=AUTH,
                       json={"operation": "upload", "objects": [{"oid": sha, "size": 100_000}]})
        return r.json()["objects"][0]
    assert "actions" not in batch("alice/a") and "actions" in batch("alice/c")
    commit = [{"key": "header", "value": {"summary": "steal"}},
              {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": sha, "size": 100_000}}]
    r = httpx.post(f"{hub.url}/api/models/alice/c/commit/main", headers=AUTH,
                   content="\n".join(json.dumps(line) for line in commit))
    assert r.status_code == 422 and "w.safetensors" not in hub.files("alice/c")


def test_read_only_token_reads_but_cannot_write(tmp_path):
    with FakeHub(users={"alice": ALICE}, read_tokens={"alice": "hf_alice_read"}) as hub:
        hub.seed_repo("alice/m", {"config.json": b"{}"})
        ro = HfApi(endpoint=hub.url, token="hf_alice_read")
        me = ro.whoami()
        assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "read"
        assert ro.model_info("alice/m").id == "alice/m"
        assert open(ro.hf_hub_download("alice/m", "config.json", cache_dir=tmp_path / "c"), "rb").read() == b"{}"
        before = [c.oid for c in hub.commits("alice/m")]
        writes = {"create_repo": lambda: ro.create_repo("alice/x"),
                  "upload": lambda: ro.upload_file(repo_id="alice/m", path_or_fileobj=b"x", path_in_repo="x.txt"),
                  "branch": lambda: ro.create_branch("alice/m", branch="dev"),
                  "settings": lambda: ro.update_repo_settings("alice/m", private=True),
                  "discussion": lambda: ro.create_discussion("alice/m", title="hi"),
                  "delete": lambda: ro.delete_repo("alice/m")}
        for name, write in writes.items():
            with pytest.raises(HfHubHTTPError) as e:
                write()
            assert e.value.response.status_code == 403, name
        read_auth = {"Authorization": "Bearer hf_alice_read"}
        assert httpx.get(f"{hub.url}/api/models/alice/m/xet-write-token/main", headers=read_auth).status_code == 403
        assert httpx.get(f"{hub.url}/api/models/alice/m/xet-read-token/main", headers=read_auth).status_code == 200
        assert [c.oid for c in hub.commits("alice/m")] == before and not hub.repo_exists("alice/x")
        assert HfApi(endpoint=hub.url, token=ALICE).create_repo("alice/x").repo_id == "alice/x"  # the write token may


def test_repo_ids_are_case_insensitive(hub, api, tmp_path, transfer):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(50_000))
    assert api.create_repo("alice/MixedCase").repo_id == "alice/MixedCase"
    assert api.model_info("alice/mixedcase").id == "alice/MixedCase"  # found, and the casing kept
    api.upload_file(repo_id="ALICE/MIXEDCASE", path_or_fileobj=weights, path_in_repo="w.safetensors")
    assert hub.files("alice/mixedcase")["w.safetensors"] == weights.read_bytes()
    assert hub.repo_id("Alice/MIXEDcase") == "alice/MixedCase" and api.repo_exists("alice/MIXEDCASE")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/mixedCASE")
    assert e.value.response.status_code == 409
    assert api.create_repo("alice/mixedcase", exist_ok=True).repo_id == "alice/MixedCase"
    path = api.hf_hub_download("Alice/MIXEDcase", "w.safetensors", cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == weights.read_bytes()


def test_file_size_limit(tmp_path, transfer):
    with FakeHub(users={"alice": ALICE}, max_file_size=100_000) as hub:
        api = HfApi(endpoint=hub.url, token=ALICE)
        api.create_repo("alice/m")
        (tmp_path / "ok.bin").write_bytes(os.urandom(100_000))
        (tmp_path / "big.bin").write_bytes(os.urandom(100_001))
        api.upload_file(repo_id="alice/m", path_or_fileobj=tmp_path / "ok.bin", path_in_repo="ok.bin")
        hub.reset_counters()
        with pytest.raises(HfHubHTTPError) as e:
            api.upload_file(repo_id="alice/m", path_or_fileobj=tmp_path / "big.bin", path_in_repo="big.bin")
        assert e.value.response.status_code == 400 and "Maximum individual file size is 100000 bytes" in str(e.value)
        assert hub.bytes_uploaded == 0 and "big.bin" not in hub.files("alice/m")
        r = httpx.post(f"{hub.url}/alice/m.git/info/lfs/objects/batch", headers=AUTH,
                       json={"operation": "upload", "objects": [{"oid": "0" * 64, "size": 10 ** 6}]})
        assert r.json()["objects"][0]["error"]["code"] == 422
    with FakeHub() as hub:
        assert hub.max_file_size == 50 * 1000 ** 3 and "50.0GB" in hub._too_large(50 * 1000 ** 3 + 1)


def test_seed_repo_revisions(hub, api, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 100)
    first = {"config.json": b'{"v": 1}', "model.safetensors": tmp_path / "w.safetensors"}
    sha1 = hub.seed_repo("microsoft/tiny", first, license="mit", tags=["phi"], created_at="2024-05-01T00:00:00Z")
    sha2 = hub.seed_repo("microsoft/tiny", {"config.json": b'{"v": 2}'}, message="v2")
    assert [c.oid for c in hub.commits("microsoft/tiny")][1:] == [sha1, sha2]
    assert hub.commits("microsoft/tiny")[-1].parent == sha1
    assert hub.files("microsoft/tiny", revision=sha1)["config.json"] == b'{"v": 1}'
    assert hub.files("microsoft/tiny")["model.safetensors"] == b"\x00" * 100  # a new revision keeps other files
    info = api.model_info("microsoft/tiny")
    assert info.sha == sha2 and info.card_data["license"] == "mit" and "phi" in info.tags
    assert info.created_at == datetime(2024, 5, 1, tzinfo=timezone.utc)
    path = api.hf_hub_download("microsoft/tiny", "config.json", revision=sha1, cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == b'{"v": 1}'
