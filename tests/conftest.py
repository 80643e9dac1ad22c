"""Shared fixtures: a local Hub server, the tiny Phi models, an isolated HF cache.

The Hub client reads some settings when it is imported, so they are set here, before any test
module imports huggingface_hub.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HUGGINGFACE_CO_STAGING", None)
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the default here; the `transfer` fixture turns Xet on per test
# hf_xet reads its settings once, when huggingface_hub first opens its (process-wide) Xet session:
# retry faults quickly, instead of the 5 attempts from 3 s up that production wants
os.environ.update(HF_XET_CLIENT_RETRY_MAX_ATTEMPTS="3", HF_XET_CLIENT_RETRY_BASE_DELAY="20ms",
                  HF_XET_CLIENT_RETRY_MAX_DURATION="5s")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(var, None)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENTINEL_TOKEN = "hf_SENTINEL-token-never-to-be-shown-0123456789"  # fake; dashes keep secret scanners quiet
USER = "hubbot-tester"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    # failed reports go to a per-test folder; the converter and the tiny models are shared, so they are
    # fetched and built once (resolved from the session's HUBBOT_CACHE, before it is pointed at tmp_path)
    monkeypatch.setenv("HUBBOT_LLAMA_CPP_DIR", str(_shared_converter()))
    monkeypatch.setenv("HUBBOT_TINY_MODEL_CACHE", str(_shared_tiny_model_cache()))
    monkeypatch.setenv("HUBBOT_CACHE", str(tmp_path / "hubbot-cache"))


@functools.cache
def _shared_converter() -> Path:
    from hubbot.backends.gguf import converter_dir

    return converter_dir()


@functools.cache
def _shared_tiny_model_cache() -> Path:
    from tests.fixtures import default_cache_dir

    return default_cache_dir()


@pytest.fixture(params=["xet", "lfs"])
def transfer(request, monkeypatch) -> str:
    """How the Hub client uploads: "xet" (hf_xet, its default when installed) or "lfs" (HF_HUB_DISABLE_XET).
    huggingface_hub reads the variable at import, so the constant is patched too; the variable is for
    subprocesses. The test Hub serves both, as the Hub does."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", request.param == "lfs")
    if request.param == "xet":
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return request.param


@pytest.fixture
def hub():
    from tests.hubserver import FakeHub

    with FakeHub(users={USER: SENTINEL_TOKEN, "someone-else": "hf_other_user_token_123456"}) as server:
        yield server


@pytest.fixture
def hub_env(hub, monkeypatch):
    """The environment `hubbot publish` sees when pointed at the local Hub."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
    return hub


@pytest.fixture(scope="session")
def tiny_phi3() -> Path:
    """The bundled example model (kind phi3: sentencepiece tokenizer, trained on the recipe prompts)."""
    example = ROOT / "examples" / "tiny-phi3"
    if example.is_dir():
        return example
    from tests.fixtures import cached_tiny_model

    return cached_tiny_model("phi3")
