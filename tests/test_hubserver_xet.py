"""The test Hub's Xet side (tests/hubserver_xet.py), driven by the real huggingface_hub + hf_xet client,
and hubbot's HubTarget against Xet faults. Every test here uploads through Xet (the `transfer` fixture)."""
import json
import os
import subprocess
import sys

import hf_xet
import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hubbot.errors import PublishError
from hubbot.publish import HubTarget
from hubbot.xet_errors import classify_xet_error
from tests.hubserver import FakeHub
from tests.hubserver_xetformat import (
    BOOKEND,
    blake3_keyed,
    chunk_hash,
    file_hash,
    hash_hex,
    hash_raw,
    parse_shard,
    read_chunks,
)

pytestmark = [pytest.mark.usefixtures("transfer"), pytest.mark.parametrize("transfer", ["xet"], indirect=True)]

ALICE, BOB = "hf_alice_token", "hf_bob_token"
AUTH = {"Authorization": f"Bearer {ALICE}"}


@pytest.fixture
def hub():
    with FakeHub(users={"alice": ALICE, "bob": BOB}) as hub:
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def data():
    """Random bytes (stored as is), repetitive text (LZ4) and the same random block again (deduplicated)."""
    block = os.urandom(300_000)
    return block + b"xet " * 100_000 + block


def xet_token(hub, repo="alice/m", scope="read", token=ALICE):
    r = httpx.get(f"{hub.url}/api/models/{repo}/xet-{scope}-token/main", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()


def test_hashes_agree_with_hf_xet(tmp_path):
    # BLAKE3's published keyed-mode vector: empty input, key "whats the Elvish word for friend"
    assert blake3_keyed(b"whats the Elvish word for friend", b"").hex() == \
        "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26"
    for size in (1, 64, 1024, 1025, 3000, 5000):  # one Xet chunk each; BLAKE3 tree mode above 1 KiB
        data = bytes(i * 7 % 251 for i in range(size))
        (tmp_path / "f").write_bytes(data)
        assert hash_hex(file_hash([(chunk_hash(data), size)])) == hf_xet.hash_files([str(tmp_path / "f")])[0].hash
    raw = os.urandom(32)
    assert hash_raw(hash_hex(raw)) == raw and hash_hex(bytes(range(32)))[:16] == "0706050403020100"


def test_upload_and_download_go_through_the_cas(hub, api, data, tmp_path):
    api.create_repo("alice/m")
    (tmp_path / "w.bin").write_bytes(data)
    api.create_commit("alice/m", [CommitOperationAdd("w.bin", tmp_path / "w.bin")], commit_message="w")
    assert hub.files("alice/m")["w.bin"] == data
    [xorb] = hub.cas.xorbs.values()
    schemes = {xorb.data[start + 4] for start in [0, *xorb.boundaries[:-1]]}
    assert {0, 1} <= schemes  # random chunks stored as they are, the text LZ4-compressed
    assert hub.cas.xorb_bytes_received == len(xorb.data) < len(data)  # the repeated block was sent once
    xet_hash = hub.xet_files("alice/m")["w.bin"]
    [entry] = api.get_paths_info("alice/m", ["w.bin"])
    sha256 = hub.commits("alice/m")[-1].tree["w.bin"].sha256
    assert (entry.size, entry.lfs.sha256, entry.xet_hash) == (len(data), sha256, xet_hash)
    assert [e.xet_hash for e in api.list_repo_tree("alice/m") if e.path == "w.bin"] == [xet_hash]

    hub.reset_counters()
    path = api.hf_hub_download("alice/m", "w.bin", cache_dir=tmp_path / "c")
    assert open(path, "rb").read() == data
    assert [(m, s) for m, p, s in hub.requests if "/resolve/" in p] == [("HEAD", 200)]  # no body from /resolve
    assert hub.cas.xorb_bytes_served == len(xorb.data)


def test_byte_grouped_chunks_decode(hub, tmp_path):
    """hf_xet picks BG4-LZ4 for some float data; forced here in a client process of its own."""
    import numpy as np

    floats = np.random.default_rng(0).normal(0, 0.02, 100_000).astype(np.float32).tobytes()
    (tmp_path / "f.bin").write_bytes(floats)
    HfApi(endpoint=hub.url, token=ALICE).create_repo("alice/f")
    upload_in_subprocess(hub, "alice/f", tmp_path / "f.bin", tmp_path / "home",
                         HF_XET_XORB_COMPRESSION_POLICY="bg4-lz4")
    [xorb] = hub.cas.xorbs.values()
    assert {xorb.data[start + 4] for start in [0, *xorb.boundaries[:-1]]} == {2}
    assert hub.files("alice/f")["w.bin"] == floats  # the CAS checked the sha256 of what it decoded


def upload_in_subprocess(hub, repo, path, home, **env):
    """Upload ``path`` as w.bin with a client process of its own (its own Xet cache and settings)."""
    code = ("import sys; from huggingface_hub import HfApi, CommitOperationAdd as Op\n"
            "HfApi(endpoint=sys.argv[1], token=sys.argv[2]).create_commit("
            "sys.argv[3], [Op('w.bin', sys.argv[4])], commit_message='w')")
    child = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    child.update(HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    result = subprocess.run([sys.executable, "-c", code, hub.url, ALICE, repo, str(path)], env=child,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_global_dedup_spares_a_fresh_client_the_upload(hub, tmp_path):
    """A second machine (its own Xet cache) publishing the same bytes to another repo sends no xorb:
    the CAS's deduplication answer tells it which xorb already holds them."""
    (tmp_path / "w.bin").write_bytes(os.urandom(2_000_000))
    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/a")
    api.create_repo("alice/b")
    upload_in_subprocess(hub, "alice/a", tmp_path / "w.bin", tmp_path / "home-a")
    assert hub.cas.xorb_bytes_received > 2_000_000
    hub.reset_counters()
    upload_in_subprocess(hub, "alice/b", tmp_path / "w.bin", tmp_path / "home-b")
    assert hub.cas.xorb_bytes_received == 0 and hub.bytes_uploaded == 0
    assert [s for m, p, s in hub.requests if p.startswith("/cas/v1/chunks/")] == [200]
    assert hub.cas.files_registered == [(("model", "alice/b"), hub.xet_files("alice/b")["w.bin"])]
    assert hub.files("alice/b")["w.bin"] == (tmp_path / "w.bin").read_bytes()


def test_reconstruction_honours_ranges_and_fetches_are_signed(hub, api, data):
    api.create_repo("alice/m")
    api.create_commit("alice/m", [CommitOperationAdd("w.bin", data)], commit_message="w")
    token = xet_token(hub)
    cas, auth = token["casUrl"], {"Authorization": f"Bearer {token['accessToken']}"}
    file_id = hub.xet_files("alice/m")["w.bin"]

    def read(first, last):
        r = httpx.get(f"{cas}/v1/reconstructions/{file_id}", headers={**auth, "Range": f"bytes={first}-{last}"})
        r.raise_for_status()
        answer, out = r.json(), b""
        for term in answer["terms"]:
            start, end = term["range"]["start"], term["range"]["end"]
            fetch = next(f for f in answer["fetch_info"][term["hash"]]
                         if f["range"]["start"] <= start and end <= f["range"]["end"])
            span = fetch["url_range"]
            raw = httpx.get(fetch["url"], headers={"Range": f"bytes={span['start']}-{span['end']}"})
            assert raw.status_code == 206
            chunks = [c for c, _ in read_chunks(raw.content)]
            out += b"".join(chunks[start - fetch["range"]["start"]:end - fetch["range"]["start"]])
        return out[answer["offset_into_first_range"]:][:last - first + 1]

    for first, last in ((0, len(data) - 1), (5, 17), (299_990, 300_020), (len(data) - 3, len(data) + 100)):
        assert read(first, last) == data[first:last + 1]
    assert httpx.get(f"{cas}/v1/reconstructions/{file_id}",
                     headers={**auth, "Range": f"bytes={len(data)}-{len(data) + 5}"}).status_code == 416
    fetch = httpx.get(f"{cas}/v1/reconstructions/{file_id}", headers=auth).json()["fetch_info"]
    url = next(iter(fetch.values()))[0]["url"]
    assert httpx.get(url).status_code == 403  # a signed fetch needs its Range
    assert httpx.get(url.split("?")[0], headers={"Range": "bytes=0-10"}).status_code == 403
    assert httpx.get(f"{cas}/v1/reconstructions/{file_id}").status_code == 401
    # another repo's token does not reach this repo's files
    api.create_repo("alice/other")
    other = xet_token(hub, "alice/other")
    assert httpx.get(f"{cas}/v1/reconstructions/{file_id}",
                     headers={"Authorization": f"Bearer {other['accessToken']}"}).status_code == 404


def test_cas_refuses_what_does_not_check_out(hub, api, data):
    api.create_repo("alice/m")
    api.create_commit("alice/m", [CommitOperationAdd("w.bin", data)], commit_message="w")
    [shard] = hub.cas.shards
    hub.reset_counters()
    token = xet_token(hub, scope="write")
    cas, auth = token["casUrl"], {"Authorization": f"Bearer {token['accessToken']}"}

    def post_shard(body, headers=auth):
        return httpx.post(f"{cas}/v1/shards", content=body, headers=headers)

    assert post_shard(shard).json() == {"result": 0}  # the same shard again: nothing new, not an error
    [record], _ = parse_shard(shard)
    sha_at = shard.index(hash_raw(record.sha256))
    tampered_sha = shard[:sha_at] + bytes(32) + shard[sha_at + 32:]
    file_at = shard.index(hash_raw(record.hash))
    tampered_file = shard[:file_at] + os.urandom(32) + shard[file_at + 32:]
    proof_at = shard.index(record.verification[0])
    tampered_proof = shard[:proof_at] + os.urandom(32) + shard[proof_at + 32:]
    for body, reason in ((tampered_sha, "sha256"), (tampered_file, "merkle hash"), (tampered_proof, "verification"),
                         (b"not a shard", "magic"), (shard[:shard.index(BOOKEND)], "bookend")):
        r = post_shard(body)
        assert r.status_code == 400 and reason in r.text, (reason, r.text)
    read = xet_token(hub)
    assert post_shard(shard, {"Authorization": f"Bearer {read['accessToken']}"}).status_code == 403
    assert post_shard(shard, {}).status_code == 401
    r = httpx.post(f"{cas}/v1/xorbs/default/{'ab' * 32}", content=b"\x00\x05\x00\x00\x00\x05\x00\x00abc", headers=auth)
    assert r.status_code == 400 and "truncated" in r.text
    assert len(hub.commits("alice/m")) == 2 and hub.cas.files_registered == []


def test_xet_tokens_follow_the_repo_rules(hub, api):
    api.create_repo("alice/m")
    api.create_repo("alice/secret", private=True)
    assert xet_token(hub, "alice/m", "write")["casUrl"] == f"{hub.url}/cas"
    bob = {"Authorization": f"Bearer {BOB}"}
    assert httpx.get(f"{hub.url}/api/models/alice/m/xet-write-token/main", headers=bob).status_code == 403
    assert httpx.get(f"{hub.url}/api/models/alice/m/xet-read-token/main", headers=bob).status_code == 200
    # opening a pull request: the client asks for revision "None"
    assert httpx.get(f"{hub.url}/api/models/alice/m/xet-write-token/None?create_pr=1", headers=bob).status_code == 200
    r = httpx.get(f"{hub.url}/api/models/alice/secret/xet-read-token/main", headers=bob)
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "RepoNotFound"
    r = httpx.get(f"{hub.url}/api/models/alice/m/xet-read-token/nope", headers=AUTH)
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "RevisionNotFound"
    r = httpx.get(f"{hub.url}/api/models/alice/m/xet-read-token/main", headers=AUTH)
    assert r.headers["X-Xet-Access-Token"] == r.json()["accessToken"] and int(r.headers["X-Xet-Token-Expiration"]) > 0


def test_cas_faults_are_retried_by_hf_xet(hub, api, data):
    api.create_repo("alice/m")
    hub.inject(method="POST", path=r"^/cas/v1/xorbs/", status=500, times=1)
    hub.inject(method="POST", path=r"^/cas/v1/shards", drop=True, times=1)
    api.create_commit("alice/m", [CommitOperationAdd("w.bin", data)], commit_message="w")
    assert [s for m, p, s in hub.requests if p.startswith("/cas/v1/xorbs/")] == [500, 200]
    assert [s for m, p, s in hub.requests if p.startswith("/cas/v1/shards")] == [0, 200]
    assert hub.files("alice/m")["w.bin"] == data


def test_hf_xet_failures_are_classified(hub, api):
    api.create_repo("alice/m")
    failures = {}
    for name, fault in (("5xx", dict(method="POST", path=r"^/cas/v1/xorbs/", status=503, times=100)),
                        ("400", dict(method="POST", path=r"^/cas/v1/shards", status=400, times=100)),
                        ("token 403", dict(method="GET", path=r"/xet-write-token/", status=403, times=100))):
        hub.clear_faults()
        hub.inject(**fault)
        with pytest.raises(Exception) as e:
            api.create_commit("alice/m", [CommitOperationAdd("w.bin", os.urandom(50_000))], commit_message="w")
        failures[name] = e.value
    assert {n: classify_xet_error(e) for n, e in failures.items()} == \
        {"5xx": "transient", "400": "permanent", "token 403": "permanent"}
    assert all(type(e) is ConnectionError for e in failures.values())  # what hf_xet raises, whatever the status
    with pytest.raises(HfHubHTTPError) as http_error:
        api.model_info("alice/nothing")
    for other in (http_error.value, ValueError("Network error: a ValueError is not hf_xet's"), KeyError("x"),
                  ConnectionError("connection refused"), RuntimeError("Server error: not a ConnectionError")):
        assert classify_xet_error(other) == "not-xet", other
    assert classify_xet_error(ConnectionError("Network error: Request error: error sending request")) == "transient"
    assert classify_xet_error(hf_xet.XetAuthenticationError("Authentication error: token refresh failed")) == \
        "permanent"


@pytest.fixture
def staged(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "w.gguf").write_bytes(b"GGUF" + os.urandom(200_000))
    (folder / "README.md").write_text("# w\n")
    (folder / "hubbot.json").write_text(json.dumps({"key": "k1", "files": {"w.gguf": {}, "README.md": {}}}))
    return folder


def hub_target(hub, logs):
    return HubTarget(HfApi(endpoint=hub.url, token=ALICE), "alice", retries=3, log=logs.append, sleep=lambda s: None)


def test_hub_target_retries_a_transient_xet_failure(hub, staged):
    """hf_xet retries a failing xorb upload 3 times here (conftest), then raises; HubTarget retries the
    commit and the second attempt lands."""
    hub.inject(method="POST", path=r"^/cas/v1/xorbs/", status=500, times=4)
    logs = []
    result = hub_target(hub, logs).push("alice/w", staged, "hubbot: w", "")
    assert result.commit == hub.commits("alice/w")[-1].oid and set(hub.xet_files("alice/w")) == {"w.gguf"}
    assert [s for m, p, s in hub.requests if p.startswith("/cas/v1/xorbs/")] == [500] * 4 + [200]
    assert any("Xet storage" in line and "retry 1/2" in line for line in logs)


def test_hub_target_gives_up_on_a_persistent_xet_failure(hub, staged):
    hub.inject(method="POST", path=r"^/cas/v1/xorbs/", status=500, times=1000)
    with pytest.raises(PublishError) as e:
        hub_target(hub, []).push("alice/w", staged, "hubbot: w", "")
    message = str(e.value)
    assert message.startswith("commit to alice/w failed after 3 attempt(s): Xet storage answered HTTP 500 on ")
    assert "/cas/v1/xorbs/default/" in message and message.endswith("nothing was committed")
    assert "\n" not in message and ALICE not in message
    assert [c.title for c in hub.commits("alice/w")] == ["initial commit"] and hub.cas.files_registered == []


def test_hub_target_reports_a_hub_without_xet_at_once(staged):
    with FakeHub(users={"alice": ALICE}, xet=False) as hub:
        with pytest.raises(PublishError) as e:
            hub_target(hub, []).push("alice/w", staged, "hubbot: w", "")
        assert "failed after 1 attempt(s): Xet storage answered HTTP 404 on " in str(e.value)
        assert "HF_HUB_DISABLE_XET=1" in str(e.value)
        assert len([p for m, p, s in hub.requests if "/xet-write-token/" in p]) == 1
