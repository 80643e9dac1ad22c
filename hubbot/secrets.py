"""The Hub token must never be shown: everything printed, logged or written goes through ``redact``."""

from __future__ import annotations

import os

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _secrets() -> list[str]:
    found = [os.environ.get(k, "") for k in TOKEN_VARIABLES]
    try:
        from huggingface_hub import get_token

        found.append(get_token() or "")
    except Exception:  # noqa: BLE001 - redaction must never fail
        pass
    return [s for s in found if len(s) >= 8]


def redact(text: str) -> str:
    """Remove the Hub token from anything about to be shown."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text
