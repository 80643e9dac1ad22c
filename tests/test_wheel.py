"""hubbot as a wheel: its recipes and templates ship inside it. Installed in a fresh venv that sees
the main environment's dependencies but not this checkout, it lists its recipes and publishes the
bundled example to ``--out``, from a folder outside the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
NOT_PACKAGED = (".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                "benchmarks", "examples", "tests", "hub-preview")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the checkout (the build leaves build/ and *.egg-info behind)."""
    src, dist = tmp_path_factory.mktemp("src") / "hubbot", tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--wheel-dir", str(dist), str(src)], check=True, timeout=600)
    [built] = dist.glob("hubbot-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed, and the main environment's site-packages on its path (a
    plain .pth line: that folder's own .pth files, the editable install's finder among them, do not run)."""
    env = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=600)
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "main-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HUBBOT_RECIPES_DIR",
                                                                 "HUBBOT_TEMPLATES_DIR")}
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=900)


def test_wheel_holds_every_recipe_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "templates"):
        shipped = {n.split("/", 2)[2] for n in names if n.startswith(f"hubbot/{folder}/")}
        assert shipped == {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()}


def test_installed_wheel_lists_recipes_and_publishes_the_example(installed, tiny_phi3, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(installed, "python", "-c", "import hubbot, hubbot.recipe, hubbot.card; "
                "print(hubbot.__file__); print(hubbot.recipe.recipes_dir()); print(hubbot.card.templates_dir())",
                cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(installed), path  # the wheel's copy, not this checkout

    listed = run(installed, "hubbot", "recipes", "list", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "family 'phi' (phi.yaml)" in listed.stdout and "edge-gguf" in listed.stdout

    model = shutil.copytree(tiny_phi3, elsewhere / "tiny-phi3")
    published = run(installed, "hubbot", "publish", str(model), "--recipe", "edge-gguf", "--out", "preview",
                    cwd=elsewhere)
    assert published.returncode == 0, published.stderr
    repo = elsewhere / "preview" / "tiny-phi3-GGUF"
    manifest = json.loads((repo / "hubbot.json").read_text())
    assert manifest["recipe"]["name"] == "edge-gguf"
    assert {p.name for p in repo.iterdir()} == {*manifest["files"], "hubbot.json"}
    assert {"tiny-phi3-Q4_K_M.gguf", "tiny-phi3-Q8_0.gguf", "tiny-phi3-F16.gguf", "README.md"} <= set(manifest["files"])
    card = (repo / "README.md").read_text()
    assert card.startswith("---\n") and "# tiny-phi3 — GGUF" in card and "## Provenance" in card
    assert all(r["passed"] for r in json.loads((repo / "validation.json").read_text())["variants"])
