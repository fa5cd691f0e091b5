"""run.json: where a run came from, kept across resumes."""

import json
import pathlib
import subprocess

import pytest

from dreamer_jax.provenance import RUN_FILE, last_command, provenance, record_start

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_provenance_names_commit_versions_devices_and_command(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=false")
    info = provenance(["--configs", "classic", "--seed", "3"])
    assert info["command"][-4:] == ["--configs", "classic", "--seed", "3"]
    assert info["xla_flags"] == "--xla_cpu_use_onednn=false"
    for package in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert info["versions"][package], package
    assert info["devices"] and info["backend"] == "cpu" and info["hostname"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert info["git_commit"] == head.stdout.strip()
    assert isinstance(info["git_dirty"], bool)
    json.dumps(info)  # all JSON values


def test_each_start_is_kept_and_the_latest_is_on_top(tmp_path):
    record_start(tmp_path, {"hostname": "a", "started": "t0"}, step=0)
    content = record_start(tmp_path, {"hostname": "b", "started": "t1"}, step=800)
    assert json.loads((tmp_path / RUN_FILE).read_text()) == content
    assert content["hostname"] == "b"
    assert [(s["hostname"], s["step"]) for s in content["starts"]] == [("a", 0), ("b", 800)]


def test_unreadable_run_json_is_kept_aside(tmp_path):
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        content = record_start(tmp_path, {"hostname": "a"}, step=0)
    assert len(content["starts"]) == 1
    assert (tmp_path / (RUN_FILE + ".unreadable")).read_text() == "{not json"


def test_last_command_is_the_latest_starts_shell_quoted_or_none(tmp_path):
    assert last_command(tmp_path) is None  # no run.json
    record_start(tmp_path, {"command": ["python", "-m", "t", "--steps", "9"]}, step=0)
    record_start(tmp_path, {"command": ["python", "-m", "t", "--task", "a b"]}, step=400)
    assert last_command(tmp_path) == "python -m t --task 'a b'"
    (tmp_path / RUN_FILE).write_text('{"starts": []}')
    assert last_command(tmp_path) is None
