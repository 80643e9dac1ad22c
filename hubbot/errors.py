"""Errors the CLI turns into one clear line and an exit code."""

from __future__ import annotations


class HubbotError(Exception):
    """Something went wrong that the user can act on; the message says what."""

    exit_code = 1


class UsageError(HubbotError):
    """Bad input: a malformed recipe, an unknown source, a wrong option. Nothing was built."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe file is malformed: names the file, the key path and what is allowed."""

    def __init__(self, path: object, key_path: str, message: str):
        self.path = str(path)
        self.key_path = key_path
        where = f"{self.path}: {key_path}" if key_path else self.path
        super().__init__(f"{where}: {message}")


class UnsupportedSource(UsageError):
    """Nothing of the recipe can be built for this source's architecture (hubbot/backends/support.py)."""


class MissingExtraError(HubbotError):
    """A format's toolchain is not installed."""

    exit_code = 3

    def __init__(self, fmt: str, extra: str, missing: str):
        super().__init__(
            f"the {fmt} backend needs '{missing}', which is not installed: "
            f"pip install 'hubbot[{extra}]'"
        )


class MissingToolError(HubbotError):
    """A program hubbot needs on this machine (cmake, a compiler) is missing; the message says what to install."""

    exit_code = 3


class BuildError(HubbotError):
    """A format tool failed or produced something that does not check out."""


class ValidationFailed(HubbotError):
    """At least one variant failed validation; nothing of its repo was published."""


class PublishError(HubbotError):
    """The Hub refused or failed the push; the message says what is known of the repo's state."""


class DiskFullError(HubbotError):
    """A disk filled up during the run; what had been written to temp folders was removed."""


class HubUnreachable(HubbotError):
    """The Hub could not be reached (DNS, refused, TLS, timeout, dropped connection): names the endpoint and
    the cause."""
