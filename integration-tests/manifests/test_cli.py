"""The renderer's command line: every command reads its flags with the same parser and refuses
what it does not take (issue 15), so a mistyped flag fails a CI job or a pod's init container
instead of rendering something else than asked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import RENDER, WASM

CONFIG = """\
model:
  services:
    chat:
      instances:
        - {name: m, base-url: "http://127.0.0.1:9", weight: 1}
"""

# Each command with what it needs to succeed, so the only fault on the line is the one a test adds.
COMMANDS = {
    "check": ["FILE"],
    "plugin-config": ["FILE"],
    "bootstrap": ["FILE", "--wasm", str(WASM)],
    "watch": ["FILE", "--wasm", str(WASM), "--live-dir", "LIVE"],
    "istio": ["FILE", "--wasm-url", "oci://registry.example/jairouter:1", "--gateway", "istio-system/gw"],
    "envoy-gateway": ["FILE", "--wasm-url", "oci://registry.example/jairouter:1", "--gateway", "gw"],
    "info": ["FILE", "model"],
    "hash-key": [],
}


def run(tmp_path: Path, command: str, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "application.yml"
    config.write_text(CONFIG)
    args = [str(config) if a == "FILE" else str(tmp_path / "live") if a == "LIVE" else a
            for a in COMMANDS[command]]
    return subprocess.run([str(RENDER), command, *args, *extra], capture_output=True, text=True,
                          input="sk-test-key\n", timeout=10)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_an_unknown_flag(tmp_path, command):
    result = run(tmp_path, command, "--bogus", "1")
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert f"{command}: unknown flag --bogus" in result.stderr, result.stderr
    assert f"usage: jairouter-render {command}" in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if c != "hash-key"))
def test_every_command_refuses_a_missing_value_and_a_repeated_flag(tmp_path, command):
    missing = run(tmp_path, command, "--api-keys")
    assert missing.returncode == 2, missing.stderr
    assert f"{command}: --api-keys needs a value" in missing.stderr, missing.stderr
    keys = tmp_path / "keys.yml"
    keys.write_text("jairouter:\n  security:\n    api-key:\n      enabled: false\n")
    twice = run(tmp_path, command, "--api-keys", str(keys), "--api-keys", str(keys))
    assert twice.returncode == 2, twice.stderr
    assert f"{command}: --api-keys is given twice" in twice.stderr, twice.stderr
    assert f"usage: jairouter-render {command}" in twice.stderr


def test_hash_key_refuses_a_repeated_salt_and_an_operand(tmp_path):
    salt = "MDEyMzQ1Njc4OWFiY2RlZg=="
    assert run(tmp_path, "hash-key", "--salt", salt).returncode == 0
    twice = run(tmp_path, "hash-key", "--salt", salt, "--salt", salt)
    assert twice.returncode == 2 and "--salt is given twice" in twice.stderr, twice.stderr
    extra = run(tmp_path, "hash-key", "key.txt")
    assert extra.returncode == 2 and "unexpected argument key.txt" in extra.stderr, extra.stderr


def test_a_missing_file_and_an_unknown_command_are_usage_errors(tmp_path):
    result = subprocess.run([str(RENDER), "check"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "check: FILE is missing" in result.stderr, result.stderr
    result = subprocess.run([str(RENDER), "chek", "x"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown command chek" in result.stderr, result.stderr
    # The whole usage lists every command.
    for command in COMMANDS:
        assert f"usage: jairouter-render {command} " in result.stderr
    # A refused configuration is not a usage error: exit 1, as before.
    bad = tmp_path / "bad.yml"
    bad.write_text("model:\n  services:\n    chat:\n      instances:\n        - {name: m, base-url: h:1}\n")
    result = subprocess.run([str(RENDER), "check", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr


def test_the_commands_still_work_with_the_flags_they_take(tmp_path):
    for command in ("check", "plugin-config", "bootstrap", "istio", "envoy-gateway", "info", "hash-key"):
        result = run(tmp_path, command)
        assert result.returncode == 0, (command, result.stderr)
