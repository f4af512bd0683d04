"""Machine measurements and the profile they produce."""

from __future__ import annotations

import pytest
import yaml

from moesim import calibrate
from moesim.cli import main
from moesim.hardware import HardwareError


def test_cpu_gemm_and_memcpy_are_measured():
    gemm = calibrate.measure_cpu_gemm((64, 256))
    assert [r["tokens"] for r in gemm] == [64, 256]
    assert all(r["flops_per_s"] > 1e8 and r["seconds"] > 0 for r in gemm)
    # consistency: FLOP rate = 2 n^3 / seconds
    assert gemm[1]["flops_per_s"] == pytest.approx(2 * 256**3 / gemm[1]["seconds"])
    copy = calibrate.measure_memcpy((2**12, 2**22))
    assert all(r["bytes_per_s"] > 1e8 for r in copy)


def test_disk_read_cold(tmp_path):
    r = calibrate.measure_disk_read(str(tmp_path), nbytes=8 * 2**20, block=2**20)
    assert r["bytes"] == 8 * 2**20 and r["bytes_per_s"] > 1e6
    assert not list(tmp_path.iterdir())  # temporary file removed


def test_calibrate_cli_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "hw.yaml"
    assert main(["calibrate", "--out", str(out), "--quick", "--json"]) == 0
    profile = calibrate.load_profile(out)
    assert profile.device.kind == "cpu" and profile.device.peak_flops("fp32") > 1e8
    assert profile.links["storage"].bandwidth > 1e6
    assert profile.table.lookup("gemm", "256x256x256", "float32", 256) > 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["out"] == str(out)


def test_bad_profile_and_disk_dir(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: {name: x}\n")
    with pytest.raises(HardwareError, match="invalid device"):
        calibrate.load_profile(bad)
    assert main(["calibrate", "--out", str(tmp_path / "o.yaml"), "--disk-dir",
                 str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_deepep_fit_uses_only_the_four_calibration_numbers():
    import copy

    scen = calibrate.deepep_scenarios(normal_eps=(8, 16), ll_eps=(8, 256), seed=0)
    pub = calibrate.load_published()
    params = calibrate.fit_deepep(scen, pub)
    moved = copy.deepcopy(pub)  # every held-out figure 50 % higher: the constants stay put
    for row in moved["normal"] + moved["low_latency"]:
        if not row.get("calibration"):
            row["gbps" if "gbps" in row else "us"] *= 1.5
    assert calibrate.fit_deepep(scen, moved) == params
    cal = {k: [r for r in pub[k] if r.get("calibration")] for k in ("normal", "low_latency")}
    rows = calibrate.predict_deepep(params, scen, cal)
    assert len(rows) == 4
    for r in rows:  # the fit meets its four numbers exactly
        assert abs(r["error_pct"]) < 1e-4, r
    # per-rank low-latency structure: the fixed cost at EP8 comes out positive
    assert params.ll_alpha + 3 * params.ll_alpha_log2 > 0
