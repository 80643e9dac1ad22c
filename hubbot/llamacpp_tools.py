"""llama.cpp's own command-line tools (llama-imatrix, llama-quantize, llama-perplexity), built once.

llama-cpp-python ships the llama.cpp library, not its tools, and its quantize binding takes no
importance matrix. The tools are built from the llama.cpp sources in the same llama-cpp-python
sdist the converter comes from (``hubbot.sdist``), for exactly the installed version: cmake,
CPU only, static, only these three targets. The build happens in a staging folder that is
renamed into place when it is complete, under a lock, so a half-built copy is never used and
two runs do not build twice. Where it lands:
``<cache>/llama.cpp-<version>-tools/<machine>-<cpu>/bin``; the cpu part is a digest of the
CPU's instruction-set flags, because ggml is compiled for the CPU it is built on (-march=native).

``HUBBOT_LLAMA_CPP_TOOLS`` names a folder that already holds the three binaries (the tests point
it at one shared build).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import MissingToolError
from .paths import cache_root
from .sdist import fetch_sdist_files
from .toolrun import Fraction, run_tool

Log = Callable[[str], None]

TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")
# what cmake needs of the llama.cpp tree to configure the library and its tools
SOURCE_MEMBERS = ("CMakeLists.txt", "LICENSE", "licenses/", "cmake/", "common/", "ggml/", "include/",
                  "src/", "tools/", "vendor/")
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",  # self-contained binaries: the folder can be renamed, nothing to find at run time
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_OPENSSL": "OFF",  # no downloads: hubbot hands the tools local files
    "GGML_OPENMP": "OFF",  # ggml's own thread pool; no libgomp to find at run time
    "GGML_CCACHE": "OFF",
    "GGML_CUDA": "OFF",
    "GGML_METAL": "OFF",
    "GGML_VULKAN": "OFF",
    "GGML_BLAS": "OFF",
}
BUILD_RECORD = "build.json"


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def cpu_key() -> str:
    """The machine and a digest of its CPU's instruction-set flags: a native build runs where this matches."""
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine() or 'cpu'}-{hashlib.sha256(flags.encode()).hexdigest()[:10]}"


def tools_dir(log: Log = lambda _: None) -> Path:
    """The folder holding llama-imatrix, llama-quantize and llama-perplexity, built on first use."""
    override = os.environ.get("HUBBOT_LLAMA_CPP_TOOLS")
    if override:
        return _checked(Path(override))
    version = llama_cpp_version()
    home = cache_root() / f"llama.cpp-{version}-tools"
    target = home / cpu_key()
    if not _complete(target):
        home.mkdir(parents=True, exist_ok=True)
        with _locked(home / ".lock", log):
            if not _complete(target):  # another run may have built it while this one waited
                _build(version, target, log)
    return target / "bin"


def tool(name: str, log: Log = lambda _: None) -> Path:
    """The path of one of TOOLS."""
    return tools_dir(log) / name


def build_record(log: Log = lambda _: None) -> dict:
    """What the build of the cached tools recorded: version, seconds, cmake options, cores."""
    path = tools_dir(log).parent / BUILD_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _complete(target: Path) -> bool:
    return all((target / "bin" / t).is_file() for t in TOOLS)


def _checked(folder: Path) -> Path:
    missing = [t for t in TOOLS if not (folder / t).is_file()]
    if missing:
        raise MissingToolError(f"HUBBOT_LLAMA_CPP_TOOLS={folder} has no {', '.join(missing)}; "
                               "unset it to let hubbot build llama.cpp's tools")
    return folder


@contextmanager
def _locked(lock_file: Path, log: Log):
    with lock_file.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another run that is building llama.cpp's tools ({lock_file.parent})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def require_build_tools() -> None:
    """Raise MissingToolError naming what to install when cmake or a C/C++ compiler is missing."""
    missing = [name for name, found in (
        ("cmake", shutil.which("cmake")),
        ("a C compiler", os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
        ("a C++ compiler", os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
         or shutil.which("clang++")),
    ) if not found]
    if missing:
        raise MissingToolError(
            f"building llama.cpp's tools (for imatrix quantization) needs {' and '.join(missing)}: install "
            "cmake and a C/C++ compiler (Debian/Ubuntu: apt-get install cmake build-essential; macOS: "
            "xcode-select --install && brew install cmake), or point HUBBOT_LLAMA_CPP_TOOLS at built tools")


def cmake_progress(tail: str) -> Fraction | None:
    """cmake's '[ 42%] Building …' lines as a fraction."""
    found = re.findall(r"^\[\s*(\d{1,3})%\]", tail, flags=re.MULTILINE)
    return (float(found[-1]), 100.0) if found else None


def _build(version: str, target: Path, log: Log) -> None:
    require_build_tools()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        started, load = time.monotonic(), _load_average()
        source = fetch_sdist_files(f"llama-cpp-python=={version}", "vendor/llama.cpp/", SOURCE_MEMBERS,
                                   staging / "src", log=log)
        build = staging / "build"
        jobs = str(os.cpu_count() or 1)
        log(f"building llama.cpp's {', '.join(TOOLS)} from the llama-cpp-python {version} sdist "
            f"(once, into {target}; {jobs} parallel jobs; minutes)")
        configure = run_tool(["cmake", "-S", str(source), "-B", str(build),
                              *(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items())],
                             staging / "configure.log", what="cmake configure of llama.cpp's tools", log=log,
                             progress=None)
        compiled = run_tool(["cmake", "--build", str(build), "--target", *TOOLS, "--parallel", jobs],
                            staging / "build.log", what="building llama.cpp's tools", log=log,
                            progress=cmake_progress, check=lambda: all((build / "bin" / t).is_file() for t in TOOLS))
        (staging / "bin").mkdir()
        for name in TOOLS:
            shutil.copy2(build / "bin" / name, staging / "bin" / name)
        shutil.rmtree(build)
        shutil.rmtree(source)
        record = {"llama-cpp-python": version, "tools": list(TOOLS), "cmake_options": CMAKE_OPTIONS,
                  "parallel_jobs": int(jobs), "configure_seconds": configure.seconds,
                  "build_seconds": compiled.seconds, "total_seconds": round(time.monotonic() - started, 2),
                  "load_average_at_start": load}
        (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2))
        staging.chmod(0o755)
        staging.rename(target)
        log(f"built llama.cpp's tools in {record['total_seconds']:.0f} s ({target / 'bin'})")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
