"""A start that cannot succeed fails before any expensive work, names its real cause with the hint
for that cause, and leaves no run directory; `--quiet` prints warnings, errors and the final table.

The hub is unreachable by construction: HF_HUB_OFFLINE=1 (conftest), or HF_ENDPOINT at a localhost
port with nothing listening, or at a local server that answers as the hub's API documents
(`GET /api/models/{id}`: 404 with `X-Error-Code: RepoNotFound` for a missing repo, else the model's
info); HF_HOME is an empty folder unless a test builds a cache in the hub's layout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from adapt.cli import main
from adapt.errors import AdaptError
from adapt.preflight import check_writable, locate_model

HUB_ID = "OpenGVLab/InternVL3-1B-hf"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.fixture
def online(monkeypatch, empty_cache):
    """Offline mode off, as if HF_HUB_OFFLINE had been unset before huggingface_hub was imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def closed_port(online, monkeypatch):
    """HF_ENDPOINT at a localhost port that is bound but not listening: every connection is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    yield
    sock.close()


def _hub_server(monkeypatch, models: dict[str, dict]):
    """A local server answering `GET /api/models/{id}` as the hub does; HF_ENDPOINT points at it."""

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            repo = self.path.split("?")[0].removeprefix("/api/models/")
            body, status, headers = (json.dumps(models[repo]), 200, {}) if repo in models else (
                json.dumps({"error": "Repository not found"}), 404, {"X-Error-Code": "RepoNotFound"})
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    return server


def _cause(name: str) -> AdaptError:
    with pytest.raises(AdaptError) as caught:
        locate_model(name, timeout=2)
    return caught.value


# ----------------------------------------------------------------------------------------------
# each cause, with its own message and hint
# ----------------------------------------------------------------------------------------------
def test_offline_and_not_cached_says_so(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _cause(HUB_ID)
    assert "offline" in err.message and "not in the local cache" in err.message and str(empty_cache) in err.message
    assert "hf download" in err.hint and "tokenizer" not in str(err)


def test_unreachable_hub_is_decided_once_and_says_so(closed_port):
    started = time.monotonic()
    err = _cause(HUB_ID)
    assert time.monotonic() - started < 5  # no retries
    assert "cannot be reached" in err.message and "not in the local cache" in err.message
    assert "tokenizer" not in str(err)


def test_silent_hub_costs_one_short_timeout(online, monkeypatch):
    """A hub that accepts the connection and never answers: one timeout, no retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    started = time.monotonic()
    with pytest.raises(AdaptError, match="cannot be reached"):
        locate_model(HUB_ID, timeout=1)
    assert time.monotonic() - started < 4
    listener.close()


def test_hub_id_that_does_not_exist(online, monkeypatch):
    server = _hub_server(monkeypatch, {})
    err = _cause("OpenGVLab/InternVL3-1B-hff")
    server.shutdown()
    assert "there is no model OpenGVLab/InternVL3-1B-hff on the hub" in err.message
    assert "spelling" in err.hint


def _siblings(*names: str) -> list[dict]:
    return [{"rfilename": name, "size": 1000} for name in names]


def test_hub_checkpoint_of_another_architecture(online, monkeypatch):
    server = _hub_server(monkeypatch, {"llava-hf/llava-1.5-7b-hf": {
        "id": "llava-hf/llava-1.5-7b-hf", "config": {"model_type": "llava"},
        "siblings": _siblings("config.json", "model.safetensors", "tokenizer.json")}})
    err = _cause("llava-hf/llava-1.5-7b-hf")
    server.shutdown()
    assert "another architecture" in err.message and "'llava'" in err.message
    assert "InternVL" in err.hint


def test_hub_model_really_without_tokenizer(online, monkeypatch):
    server = _hub_server(monkeypatch, {"me/InternVL-weights-only": {
        "id": "me/InternVL-weights-only", "config": {"model_type": "internvl"},
        "siblings": _siblings("config.json", "model.safetensors")}})
    err = _cause("me/InternVL-weights-only")
    server.shutdown()
    assert "has no tokenizer" in err.message and "copy the tokenizer files" in err.hint


def test_reachable_native_hub_model_passes_with_its_weight_size(online, monkeypatch):
    server = _hub_server(monkeypatch, {HUB_ID: {
        "id": HUB_ID, "config": {"model_type": "internvl"},
        "siblings": _siblings("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")}})
    location = locate_model(HUB_ID, timeout=2)
    server.shutdown()
    assert (location.kind, location.folder, location.weight_bytes) == ("hub", None, 1000)
    assert locate_model(HUB_ID, timeout=2) == location  # the load after the preflight does not ask again


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from adapt.checkpoints.models import load

    folder = tmp_path_factory.mktemp("tiny-model")
    loaded = load("tiny", seed=0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def _cache_snapshot(home: Path, repo_id: str, source: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """`source`'s files as the hub cache holds a downloaded repo (refs/main -> snapshots/<commit>)."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        if file.name not in skip:
            (snapshot / file.name).write_bytes(file.read_bytes())
    return snapshot


def test_cached_hub_id_loads_offline_from_the_cache(empty_cache, monkeypatch, saved_tiny):
    from adapt.checkpoints.models import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _cache_snapshot(empty_cache, "me/tiny-internvl", saved_tiny)
    location = locate_model("me/tiny-internvl")
    assert (location.kind, location.folder) == ("cached", snapshot)
    assert location.weight_bytes == sum(p.stat().st_size for p in saved_tiny.glob("*.safetensors"))
    assert load("me/tiny-internvl").source == str(snapshot)


def test_cached_hub_id_without_tokenizer(empty_cache, monkeypatch, saved_tiny):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_snapshot(empty_cache, "me/tiny-internvl", saved_tiny,
                    skip=("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    err = _cause("me/tiny-internvl")
    assert "cached hub model me/tiny-internvl" in err.message and "has no tokenizer" in err.message


def test_partial_cache_defers_to_the_hub_when_online(online, empty_cache, monkeypatch, saved_tiny):
    _cache_snapshot(empty_cache, "me/tiny-internvl", saved_tiny, skip=("model.safetensors",))
    server = _hub_server(monkeypatch, {"me/tiny-internvl": {
        "id": "me/tiny-internvl", "config": {"model_type": "internvl"},
        "siblings": _siblings("config.json", "model.safetensors", "tokenizer.json")}})
    location = locate_model("me/tiny-internvl", timeout=2)
    server.shutdown()
    assert (location.kind, location.folder) == ("hub", None)


def test_folder_checkpoint_of_another_architecture(tmp_path):
    """A real text-only Qwen2 checkpoint (model_type qwen2), as a user might pass the LLM of a VLM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from adapt.checkpoints.models import load, tiny_tokenizer

    folder = tmp_path / "Qwen2-0.5B"
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=256)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    with pytest.raises(AdaptError) as caught:
        load(str(folder))
    assert "another architecture" in caught.value.message and "'qwen2'" in caught.value.message
    assert str(folder) in caught.value.message


def test_missing_folder_is_not_taken_for_a_hub_id(tmp_path):
    err = _cause(str(tmp_path / "no-such-model"))
    assert err.message == "model folder not found" and "tiny" in err.hint


def test_not_enough_disk_space_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "runs" / "r1"
    with pytest.raises(AdaptError, match="not enough free disk space"):
        check_writable(target, needed=2**62)
    assert not (tmp_path / "runs").exists()
    check_writable(target, needed=1)


def test_output_location_under_a_file(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(AdaptError, match="under a file"):
        check_writable(tmp_path / "runs" / "r1")


# ----------------------------------------------------------------------------------------------
# through the CLI: no run directory is left behind
# ----------------------------------------------------------------------------------------------
def test_offline_start_fails_fast_and_leaves_no_run_directory(empty_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    started = time.monotonic()
    code = main(["run", "--domain", "driving", "--general-ratio", "0.25", "--model", HUB_ID, "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 10
    assert "offline" in err and "not in the local cache" in err and "tokenizer" not in err
    assert not runs.exists()  # nothing was formatted, no demo data was written


def test_start_that_fails_while_formatting_removes_its_run_directory(tmp_path, capsys):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
                   "{not json\n")
    runs = tmp_path / "runs"
    code = main(["run", "--data", f"general={bad}", "--general-ratio", "0", "--strict", "--runs-dir", str(runs),
                 "--name", "r1", "--no-export", "--quiet"])
    assert code == 2, capsys.readouterr()
    assert not (runs / "r1").exists()


def test_missing_data_source_is_refused_before_the_run_directory(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["run", "--data", f"rsvqa={tmp_path / 'rsvqa'}", "--general-ratio", "0", "--runs-dir", str(runs)])
    assert code == 2 and "data source rsvqa-rsvqa (rsvqa) not found" in capsys.readouterr().err
    assert not runs.exists()


@pytest.mark.slow
def test_unreachable_hub_through_the_cli_in_a_fresh_process(tmp_path):
    """The issue's report as a user runs it: offline mode unset, the hub unreachable, an empty cache."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_ENDPOINT": f"http://127.0.0.1:{sock.getsockname()[1]}"}
    runs = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "adapt.cli", "run", "--domain", "driving", "--model", HUB_ID,
                           "--runs-dir", str(runs)], capture_output=True, text=True, env=env, timeout=300)
    sock.close()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot be reached" in done.stderr and "not in the local cache" in done.stderr
    assert "tokenizer" not in done.stderr and not runs.exists()


# ----------------------------------------------------------------------------------------------
# quiet means quiet
# ----------------------------------------------------------------------------------------------
def _small_demo(tmp_path: Path) -> list[str]:
    """`adapt run` arguments for the driving demo at reduced size: its sources written smaller (2
    scenes), its training and evaluation settings, 2 steps."""
    from domains.driving import DRIVING
    from formatters.synthetic.general import write_general_demo
    from formatters.synthetic.nuscenes import write_nuscenes

    nuscenes = write_nuscenes(tmp_path / "src" / "nuscenes", n_scenes=2, samples_per_scene=6, seed=0,
                              distractors=False)
    general = write_general_demo(tmp_path / "src" / "general", n=12, seed=0)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "domain": "driving", "general_ratio": 0.25,
        "data": [{"kind": "driving", "path": str(nuscenes), "options": {"questions": "perception"}}],
        "general": [{"kind": "general", "path": str(general)}],
        "train": {**DRIVING.demo_train, "max_steps": 2, "logging_steps": 1, "dataloader_num_workers": 0},
        "eval": {**DRIVING.demo_eval, "holdout": 2, "general_holdout": 1, "max_new_tokens": 2}}))
    return ["run", "--config", str(config), "--runs-dir", str(tmp_path / "runs"), "--no-export"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quiet_run_prints_only_the_final_table(tmp_path, capfd):
    code = main([*_small_demo(tmp_path), "--name", "quiet", "--quiet"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    lines = [line for line in (out + err).splitlines() if line.strip()]
    table = [line for line in lines if line.startswith("|")]
    assert table and "before vs after" in out
    assert not [line for line in lines if "it/s" in line or "s/it" in line or "'loss'" in line], lines
    summary = out[out.rindex("{\n"):].strip().splitlines()
    assert summary[-1] == "}" and len(summary) <= 16
    # the table, its heading and the JSON summary; nothing per step, shard or source
    assert len(lines) == len(table) + 1 + len(summary), "\n".join(lines)
    log = (tmp_path / "runs" / "quiet" / "logs" / "run.log").read_text()
    assert "formatting done" in log and "step 2: " in log and "before vs after" in log


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_one_progress_display_per_phase(tmp_path, capfd):
    code = main([*_small_demo(tmp_path), "--name", "loud"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    updates = [u.strip() for u in err.replace("\r", "\n").splitlines() if "%|" in u or "rec [" in u]
    labels = {u.split(":")[0] if not u[0].isdigit() else "training" for u in updates}
    assert labels == {"formatting", "planning", "training", "evaluation (before)", "evaluation (after)"}, labels
    assert "driving-nuscenes: read 12" in out  # each source's summary line, but no bar of its own
