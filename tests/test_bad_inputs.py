"""Bad inputs are refused before anything is built: the source's files against their headers and
config.json, its tokenizer and chat template, the namespace and repo ids, and variants too big for
the Hub. Each case asserts the exit code, a message naming the file / tensor / key with what was
expected and what was found, no uncaught exception (no traceback), no token, and nothing written
to the Hub. (test_recipes.py holds the malformed recipes and unknown sources, with the same checks.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from hubbot.cli import main
from hubbot.recipe import load_families
from hubbot.source_check import check_folder, check_shapes
from tests.conftest import SENTINEL_TOKEN
from tests.test_preflight import PHI4, TOKENIZER_FILES, _shards, machine, phi3_tensors, write_sparse_safetensors

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-phi3"
PHI = ROOT / "recipes" / "phi.yaml"
READS = ("GET",)  # a local source: the Hub sees at most the token's whoami
HUB_READS = ("GET", "HEAD")  # a Hub source: also the file metadata its download asks for (HEAD)


def assert_refused(result: Result, hub, code: int, pieces: list[str], reads: tuple[str, ...] = READS) -> str:
    """The command stopped with ``code`` and one error naming every piece; no traceback, no token,
    and no request to ``hub`` (when given) other than ``reads``. Returns the message, whitespace-joined."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and SENTINEL_TOKEN not in result.output
    message = " ".join(result.output.split())
    assert [line.startswith("Error:") for line in result.output.splitlines()].count(True) == 1, result.output
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"
    if hub is not None:
        assert not [r for r in hub.requests if r[0] not in reads], hub.requests
    return message


# ------------------------------------------------------------------------------- ways to break a folder
def copy_model(tmp: Path, name: str = "model") -> Path:
    folder = tmp / name
    shutil.copytree(TINY, folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Change a safetensors header in place, keeping the tensor data after it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def sharded_model(tmp: Path) -> Path:
    """tiny-phi3 with its weights in model-0000{1,2}-of-00002.safetensors and an index."""
    folder = copy_model(tmp)
    (folder / "model.safetensors").unlink()
    work = tmp / "shards"
    work.mkdir()
    for name, path in _shards(work).items():
        shutil.move(path, folder / name)
    return folder


def edit_index(folder: Path, edit: Callable[[dict], None]) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return folder


def publish(folder: Path, *extra: str) -> list[str]:
    return ["publish", str(folder), "--recipe", "edge-gguf", *extra]


# ------------------------------------------------------------------------------- the weight files
def truncated(tmp):
    folder = copy_model(tmp)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    return publish(folder), [f"{weights}: truncated: its header describes {size} bytes",
                             f"the file has {size - 1000}", "tensor(s) cut off"]


def longer_than_header(tmp):
    folder = copy_model(tmp)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("ab") as fh:
        fh.write(b"\0" * 16)
    return publish(folder), [f"{weights}: 16 bytes more than its header describes",
                             f"(expected {size}, found {size + 16})"]


def header_not_json(tmp):
    folder = copy_model(tmp)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8] = ord("x")  # the header's opening brace
    weights.write_bytes(bytes(raw))
    return publish(folder), [f"{weights}: safetensors header is not valid JSON"]


def not_safetensors(tmp):
    folder = copy_model(tmp)
    weights = folder / "model.safetensors"
    weights.write_text("this is not a safetensors file, just some text saved under its name")
    return publish(folder), [f"{weights}: not a safetensors file", "the header length says",
                             f"the file has {weights.stat().st_size - 8} after the length"]


def shorter_than_prefix(tmp):
    folder = copy_model(tmp)
    (folder / "model.safetensors").write_bytes(b"\x01\x02\x03")
    return publish(folder), [f"{folder / 'model.safetensors'}: not a safetensors file: 3 bytes",
                             "shorter than the 8-byte header length"]


def entry_without_shape(tmp):
    folder = copy_model(tmp)
    rewrite_header(folder / "model.safetensors", lambda h: h["model.norm.weight"].pop("shape"))
    return publish(folder), ["model.safetensors: tensor 'model.norm.weight': header entry must be",
                             '"dtype": "F32"']


def dtype_disagrees_with_offsets(tmp):
    folder = copy_model(tmp)
    rewrite_header(folder / "model.safetensors", lambda h: h["model.norm.weight"].update(dtype="F16"))
    return publish(folder), ["tensor 'model.norm.weight' (F16 [256]) needs 512 bytes, its data_offsets give 1024"]


def missing_shard(tmp):
    folder = sharded_model(tmp)
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "model.safetensors.index.json").unlink()
    return publish(folder), [f"{folder}: missing shard(s) model-00002-of-00002.safetensors: found 1 of 2"]


def index_names_absent_file(tmp):
    folder = sharded_model(tmp)
    edit_index(folder, lambda m: m.update({"model.norm.weight": "model-00003-of-00003.safetensors"}))
    return publish(folder), [f"{folder}/model.safetensors.index.json names model-00003-of-00003.safetensors, "
                             f"which {folder} does not have",
                             "(it has: model-00001-of-00002.safetensors, model-00002-of-00002.safetensors)"]


def index_maps_tensor_to_wrong_shard(tmp):
    folder = sharded_model(tmp)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n, f in sorted(index.items()) if f == "model-00002-of-00002.safetensors")
    edit_index(folder, lambda m: m.update({name: "model-00001-of-00002.safetensors"}))
    return publish(folder), [f"maps tensor '{name}' to model-00001-of-00002.safetensors, but "
                             "model-00001-of-00002.safetensors's header has no such tensor "
                             "(it is in model-00002-of-00002.safetensors)"]


def tensor_missing(tmp):
    from safetensors.numpy import load_file, save_file

    folder = copy_model(tmp)
    tensors = load_file(TINY / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return publish(folder), [f"{folder}: no tensor 'model.layers.1.mlp.down_proj.weight' in any *.safetensors file",
                             "Phi3ForCausalLM with this config.json needs it"]


# ------------------------------------------------------------------------------- shapes against config.json
def config_case(changes: dict, pieces: list[str], command=publish):
    def make(tmp):
        folder = edit_config(copy_model(tmp), **changes)
        return command(folder), [p.format(folder=folder) for p in pieces]
    return make


EMBED = "{folder}/model.safetensors: tensor 'model.embed_tokens.weight' has shape [1024, 256]"
QKV = "{folder}/model.safetensors: tensor 'model.layers.0.self_attn.qkv_proj.weight' has shape [768, 256]"
hidden_size_mismatch = config_case(
    {"hidden_size": 512}, [EMBED, "config.json gives [vocab_size = 1024, hidden_size = 512]",
                           "hidden_size is 512 in config.json, 256 in the weights"])
vocab_mismatch = config_case(
    {"vocab_size": 32064}, [EMBED, "vocab_size is 32064 in config.json, 1024 in the weights"])
layers_mismatch = config_case(
    {"num_hidden_layers": 4}, ["{folder}: config.json says num_hidden_layers = 4, but the weights have 2 layers "
                               "(model.layers.0 … model.layers.1)"])
heads_mismatch = config_case(
    {"num_attention_heads": 8}, [QKV, "config.json gives [(num_attention_heads + 2 × num_key_value_heads) × "
                                 "head_dim = 512, hidden_size = 256]: config.json's num_attention_heads = 8, "
                                 "num_key_value_heads = 4, head_dim = 32 give 512, the weights have 768"])
kv_heads_mismatch = config_case(
    {"num_key_value_heads": 1}, [QKV, "config.json's num_attention_heads = 4, num_key_value_heads = 1, "
                                 "head_dim = 64 give 384, the weights have 768"])
intermediate_mismatch = config_case(
    {"intermediate_size": 1024}, ["tensor 'model.layers.0.mlp.gate_up_proj.weight' has shape [1536, 256]",
                                  "config.json gives [2 × intermediate_size = 2048, hidden_size = 256]: "
                                  "config.json's intermediate_size = 1024 gives 2048, the weights have 1536"])
key_not_an_integer = config_case(
    {"hidden_size": "256"}, ["{folder}/config.json: 'hidden_size' must be a positive integer for Phi3ForCausalLM, "
                             "found '256'"])
heads_do_not_divide = config_case(
    {"num_attention_heads": 3}, ["{folder}/config.json: hidden_size = 256 is not a multiple of "
                                 "num_attention_heads = 3 (and there is no head_dim)"])


# ------------------------------------------------------------------------------- tokenizer, chat template
def tokenizer_not_json(tmp):
    folder = copy_model(tmp)
    (folder / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text()[:5000])
    return publish(folder), [f"{folder / 'tokenizer.json'}: not valid JSON", "the tokenizer cannot load"]


def tokenizer_does_not_load(tmp):
    folder = copy_model(tmp)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    return publish(folder), [f"{folder}: the tokenizer (tokenizer.json, tokenizer.model, tokenizer_config.json) "
                             "does not load with transformers' AutoTokenizer:"]


def tokenizer_config_not_json(tmp):
    folder = copy_model(tmp)
    (folder / "tokenizer_config.json").write_text("{'chat_template': oops")
    return publish(folder), [f"{folder / 'tokenizer_config.json'}: not valid JSON"]


def no_chat_template(tmp):
    folder = copy_model(tmp)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return publish(folder), [f"{folder}: no chat template (chat_template.jinja, or 'chat_template' in "
                             "tokenizer_config.json), but family 'phi' validates with chat prompts "
                             "(count-chat, days-chat)"]


# ------------------------------------------------------------------------------- namespaces and repo ids
NAMESPACE_ERROR = "Invalid value for '--namespace': 'bad ns!' is not a valid Hub user or org name"


def bad_namespace_out(tmp):
    return publish(TINY, "--out", str(tmp / "out"), "--namespace", "bad ns!"), [NAMESPACE_ERROR]


def bad_namespace_hub(tmp):
    return publish(TINY, "--namespace", "bad ns!"), [NAMESPACE_ERROR, "alphanumeric chars"]


def namespace_with_slash(tmp):
    return ["plan", str(TINY), "--namespace", "me/you"], ["'me/you' is not a valid Hub user or org name",
                                                          "a user or org name has no '/'"]


def bad_source_repo_id(tmp):
    return ["publish", "microsoft/Phi-4--mini"], ["source 'microsoft/Phi-4--mini' is not a valid Hub repo id",
                                                  "Cannot have -- or .."]


def bad_repo_name(tmp):
    folder = copy_model(tmp, "my model!")
    return publish(folder, "--out", str(tmp / "out")), [
        "repo name 'my model!-GGUF' is not a valid Hub repo id", "naming.gguf.repo '{model}-GGUF'",
        "model name 'my model!'"]


# ------------------------------------------------------------------------------- over the Hub's file limit
def phi4_shaped(tmp: Path) -> Path:
    """phi-4's 14.66B BF16 parameters as a sparse 29 GB file (a real header, no data blocks)."""
    folder = tmp / "phi4-shaped"
    folder.mkdir()
    config = json.loads((TINY / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **PHI4, "dtype": "bfloat16"}))
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY / name, folder / name)
    write_sparse_safetensors(folder / "model.safetensors", phi3_tensors(PHI4))
    return folder


def recipes_with_f32(tmp: Path) -> Path:
    data = yaml.safe_load(PHI.read_text())
    data["recipes"]["f32"] = {"description": "GGUF F32 and Q4_K_M", "variants": [
        {"format": "gguf", "precision": "Q4_K_M"}, {"format": "gguf", "precision": "F32"}]}
    recipes = tmp / "recipes"
    recipes.mkdir()
    (recipes / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return recipes


OVER_LIMIT = ["gguf-F32 cannot be built for phi4-shaped: its weights would be one ~58.6 GB file "
              "(phi4-shaped-F32.gguf), over the Hub's 50.0 GB per-file limit"]


def over_limit_build(tmp):
    return ["--recipes-dir", str(recipes_with_f32(tmp)), "build", str(phi4_shaped(tmp)), "--recipe", "f32",
            "--variant", "gguf-F32", "--out", str(tmp / "built")], OVER_LIMIT


# ------------------------------------------------------------------------------- the other commands
def plan_truncated(tmp):
    argv, pieces = truncated(tmp)
    return ["plan", argv[1]], pieces[:1]


def build_hidden_mismatch(tmp):
    folder = edit_config(copy_model(tmp), hidden_size=512)
    return ["build", str(folder), "--recipe", "edge-gguf", "--variant", "gguf-Q4_K_M", "--out", str(tmp / "built")], \
        [EMBED.format(folder=folder), "hidden_size is 512 in config.json, 256 in the weights"]


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], tuple[list[str], list[str]]]  # tmp_path -> (argv, pieces of the message)
    code: int = 2


LOCAL_CASES = {name: Case(make) for name, make in {
    "truncated-shard": truncated, "longer-than-its-header": longer_than_header, "header-not-json": header_not_json,
    "not-safetensors": not_safetensors, "shorter-than-the-length-prefix": shorter_than_prefix,
    "tensor-entry-without-shape": entry_without_shape, "dtype-disagrees-with-offsets": dtype_disagrees_with_offsets,
    "missing-shard": missing_shard, "index-names-absent-file": index_names_absent_file,
    "index-maps-tensor-to-wrong-shard": index_maps_tensor_to_wrong_shard, "tensor-missing": tensor_missing,
    "hidden-size-mismatch": hidden_size_mismatch, "vocab-mismatch": vocab_mismatch,
    "layer-count-mismatch": layers_mismatch, "heads-mismatch": heads_mismatch,
    "kv-heads-mismatch": kv_heads_mismatch, "intermediate-size-mismatch": intermediate_mismatch,
    "config-key-not-an-integer": key_not_an_integer, "heads-do-not-divide-hidden-size": heads_do_not_divide,
    "tokenizer-json-not-json": tokenizer_not_json, "tokenizer-does-not-load": tokenizer_does_not_load,
    "tokenizer-config-not-json": tokenizer_config_not_json, "no-chat-template-with-chat-prompts": no_chat_template,
    "bad-namespace-with-out": bad_namespace_out, "bad-namespace-hub-target": bad_namespace_hub,
    "namespace-with-slash": namespace_with_slash, "bad-source-repo-id": bad_source_repo_id,
    "bad-repo-name-from-folder": bad_repo_name, "over-50GB-build": over_limit_build,
    "plan-truncated-shard": plan_truncated,
    "build-hidden-size-mismatch": build_hidden_mismatch,
}.items()}


@pytest.fixture
def nothing_after_the_checks(monkeypatch):
    """Fail a case that gets past the checks to a build (the checks' errors come before it)."""
    def built(*args, **kwargs):
        raise AssertionError("went on to build")

    monkeypatch.setattr("hubbot.pipeline.build_and_validate", built)
    monkeypatch.setattr("hubbot.artifacts.build_and_validate", built)


@pytest.mark.parametrize("name", LOCAL_CASES)
def test_bad_local_input_is_refused(name, tmp_path, hub_env, monkeypatch, nothing_after_the_checks):
    machine(monkeypatch, "1TB")  # the memory preflight is not what refuses these
    case = LOCAL_CASES[name]
    argv, pieces = case.make(tmp_path)
    hub_env.reset_counters()
    assert_refused(CliRunner().invoke(main, argv), hub_env, case.code, pieces)
    assert not (tmp_path / "out").exists() and not (tmp_path / "built").exists()


# ------------------------------------------------------------------------------- Hub sources
def _seed(hub, repo: str, folder: Path) -> dict[str, int]:
    hub.seed_repo(repo, {p.name: p for p in folder.iterdir() if p.is_file()})
    hub.reset_counters()
    return {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}


@pytest.mark.parametrize("command", ["publish", "plan"])
def test_hub_source_with_a_config_that_disagrees_is_refused_before_the_download(command, tmp_path, hub_env):
    repo = "microsoft/Phi-4-tiny-wrong-config"
    sizes = _seed(hub_env, repo, edit_config(copy_model(tmp_path), hidden_size=512))
    result = CliRunner().invoke(main, [command, repo, "--recipe", "edge-gguf"])
    assert_refused(result, hub_env, 2, [f"{repo}@", "/model.safetensors: tensor 'model.embed_tokens.weight' has "
                                        "shape [1024, 256]", "hidden_size is 512 in config.json, 256 in the weights"],
                   reads=HUB_READS)
    # the weights were read up to their header only (by the preflights and this check), never whole
    assert hub_env.bytes_downloaded[f"{repo}/model.safetensors"] < sizes["model.safetensors"] / 2


@pytest.mark.parametrize("command", ["publish", "plan"])
def test_hub_source_missing_a_shard_is_refused_before_the_download(command, tmp_path, hub_env):
    repo = "microsoft/Phi-4-tiny-lost-shard"
    folder = sharded_model(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    sizes = _seed(hub_env, repo, folder)
    result = CliRunner().invoke(main, [command, repo, "--recipe", "edge-gguf"])
    assert_refused(result, hub_env, 2, [f"{repo}@", "missing shard(s) model-00002-of-00002.safetensors: found 1 of 2"],
                   reads=HUB_READS)
    assert hub_env.bytes_downloaded.get(f"{repo}/model-00001-of-00002.safetensors", 0) < \
        sizes["model-00001-of-00002.safetensors"] / 2


def test_hub_source_truncated_is_refused_after_the_download_before_any_build(tmp_path, hub_env,
                                                                            nothing_after_the_checks):
    repo = "microsoft/Phi-4-tiny-truncated"
    folder = copy_model(tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    os.truncate(folder / "model.safetensors", size - 4096)
    _seed(hub_env, repo, folder)
    result = CliRunner().invoke(main, ["publish", repo, "--recipe", "edge-gguf"])
    assert_refused(result, hub_env, 2, ["/model.safetensors: truncated: its header describes "
                                        f"{size} bytes", f"the file has {size - 4096}"], reads=HUB_READS)



# ------------------------------------------------------------------------------- what passes, and how fast
@pytest.mark.parametrize("kind", ["phi3", "phi4", "phi4-mini"])
def test_every_tiny_fixture_passes_the_checks(kind):
    from tests.fixtures import cached_tiny_model

    check_folder(cached_tiny_model(kind), load_families()["phi"])  # phi4-mini: tied embeddings, no lm_head


def test_a_29gb_phi4_shaped_folder_checks_in_well_under_a_second(tmp_path):
    folder = phi4_shaped(tmp_path)
    family = load_families()["phi"]
    check_folder(folder, family, tokenizer=False)  # imports safetensors once
    start = time.perf_counter()
    check_folder(folder, family, tokenizer=False)
    assert time.perf_counter() - start < 0.5
    assert (folder / "model.safetensors").stat().st_size > 29e9


def test_unknown_architectures_and_quantized_sources_are_not_shape_checked():
    tensors = {}  # nothing at all would fail every Phi3 check
    assert not check_shapes({"architectures": ["LlamaForCausalLM"], "hidden_size": 1}, tensors, "x")
    phi3 = json.loads((TINY / "config.json").read_text())
    assert not check_shapes({**phi3, "quantization_config": {"quant_method": "gptq"}}, tensors, "x")


def test_a_variant_over_the_hub_file_limit_is_dropped_and_the_rest_goes_on(tmp_path, monkeypatch):
    recipes, folder = recipes_with_f32(tmp_path), phi4_shaped(tmp_path)
    plan = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "plan", str(folder), "--recipe", "f32", "--json"])
    assert plan.exit_code == 0, plan.output
    data = json.loads(plan.stdout)
    assert [v["id"] for r in data["repos"] for v in r["variants"]] == ["gguf-Q4_K_M"]
    [dropped] = data["dropped"]
    assert dropped["id"] == "gguf-F32" and OVER_LIMIT[0].split(": ", 1)[1] in dropped["reason"]
    machine(monkeypatch, "1GB")  # the publish goes on without it, to the memory preflight of what is left
    out = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(folder), "--recipe", "f32",
                                    "--out", str(tmp_path / "out")])
    assert out.exit_code == 2 and "Error: preflight:" in out.output, out.output
    assert "gguf-F32" not in out.output.split("Error: preflight:")[1]
