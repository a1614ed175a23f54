"""Hugging Face Hub ids for the target and the drafter: found in a local Hub cache offline, fetched with
only the files loading reads, and a clear one-line error for a repo that neither the cache nor the Hub
can give."""

from __future__ import annotations

import shutil

import pytest
import torch

import ddtree
from ddtree.api import init_drafter
from ddtree.cli import main
from ddtree.errors import DDTreeError
from ddtree.hub import is_repo_id
from ddtree.loading import load_target

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """add(repo_id, directory, skip=()) copies a model directory into a Hub cache laid out as huggingface_hub
    lays it out; the cache is the Hub's for this test, and the Hub is offline. huggingface_hub reads
    HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: its constants are set as well as the environment."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(huggingface_hub.constants, name, value)
        monkeypatch.setenv(name, "1" if value is True else value)

    def add(repo_id: str, directory: str, skip: tuple[str, ...] = ()) -> str:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / COMMIT
        shutil.copytree(directory, snapshot, ignore=shutil.ignore_patterns(*skip))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return str(snapshot)

    return add


@pytest.fixture(scope="module")
def drafter_dir(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-drafter") / "drafter"
    init_drafter(model_dirs["qwen3"], str(out), num_layers=1, block_size=4)
    return str(out)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_repo_ids_are_told_from_paths():
    for spec in ("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16", "org/name_1.5"):
        assert is_repo_id(spec), spec
    for spec in ("Qwen3-8B", "./org/name", "/org/name", "org/name/extra", "org/../name", "org/", "-org/name"):
        assert not is_repo_id(spec), spec


def test_a_target_in_the_hub_cache_loads_offline(hub_cache, model_dirs, targets):
    snapshot = hub_cache("org/name", model_dirs["qwen3"])
    target = load_target("org/name")
    assert target.model_dir == snapshot and target.name == "name"
    assert same_weights(target.model, targets["qwen3"].model)


def test_load_takes_hub_ids_for_target_and_drafter(hub_cache, model_dirs, drafter_dir):
    hub_cache("org/name", model_dirs["qwen3"])
    hub_cache("org/drafter", drafter_dir)
    engine = ddtree.load("org/name", "org/drafter", device="cpu")
    assert same_weights(engine.drafter, ddtree.load(model_dirs["qwen3"], drafter_dir, device="cpu").drafter)
    assert engine.drafter.cfg.block_size == 4


def test_dummy_weights_need_only_the_configs_of_hub_repos(hub_cache, model_dirs, drafter_dir):
    hub_cache("org/name", model_dirs["qwen3"], skip=("*.safetensors",))
    hub_cache("org/drafter", drafter_dir, skip=("*.safetensors",))
    engine = ddtree.load("org/name", "org/drafter", device="cpu", dummy_weights=True)
    assert engine.drafter.cfg.block_size == 4 and engine.target.name == "name"


@pytest.mark.parametrize("dummy,weights", [(False, True), (True, False)])
def test_only_what_loading_reads_is_fetched(dummy, weights, monkeypatch, model_dirs, drafter_dir):
    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked[repo_id] = allow_patterns
        return {"org/name": model_dirs["qwen3"], "org/drafter": drafter_dir}[repo_id]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ddtree.load("org/name", "org/drafter", device="cpu", dummy_weights=dummy)
    for patterns in asked.values():
        assert "config.json" in patterns or "*.json" in patterns
        assert ("*.safetensors" in patterns) == weights
    assert set(asked) == {"org/name", "org/drafter"}


@pytest.mark.parametrize("whose", ["target", "drafter"])
def test_a_repo_missing_offline_is_one_clear_line(whose, hub_cache, model_dirs):
    hub_cache("org/name", model_dirs["qwen3"])
    target, drafter = ("org/missing", None) if whose == "target" else ("org/name", "org/missing")
    with pytest.raises(DDTreeError) as raised:
        ddtree.load(target, drafter, device="cpu")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{whose}: org/missing")
    assert "download" in message and "DIR" in message


def test_an_unreachable_hub_falls_back_to_the_cache(hub_cache, model_dirs, monkeypatch):
    """Not offline, but no network (a port that refuses): the cached repo loads, a missing one is named."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    snapshot = hub_cache("org/name", model_dirs["qwen3"])
    assert load_target("org/name").model_dir == snapshot
    with pytest.raises(DDTreeError, match="target: org/missing .* cannot be reached"):
        load_target("org/missing")


def test_generate_with_a_missing_repo_exits_2(hub_cache, capsys):
    capsys.readouterr()
    rc = main(["generate", "--target", "org/missing", "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("ddtree: error: target: org/missing") and "hf download org/missing" in err[0]


def test_a_spec_that_is_neither_path_nor_repo_id_keeps_its_error():
    with pytest.raises(DDTreeError, match="neither a model directory, a .gguf file nor the alias"):
        load_target("no-such-model")
