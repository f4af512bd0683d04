"""The command line as a user meets it: help, one-line errors, JSON output."""

import json
import subprocess
import sys

import numpy as np

from moesim.traces import Trace


def run(*args):
    return subprocess.run([sys.executable, "-m", "moesim.cli", *args], capture_output=True, text=True)


def test_help_lists_the_trace_group():
    out = run("--help")
    assert out.returncode == 0
    assert "trace" in out.stdout


def test_trace_info_json(tmp_path):
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])
    path = Trace.from_arrays(experts, num_experts=4, model="tiny").write(tmp_path / "t.parquet")
    out = run("trace", "info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["rows"], info["num_layers"], info["num_experts"], info["top_k"]) == (4, 2, 4, 2)


def test_bad_file_gives_one_error_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("hello")
    out = run("trace", "validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
