"""``moesim demo``: the README's first command on the bundled scenarios."""

from __future__ import annotations

import json

from moesim.cli import main


def test_demo_json_runs_every_bundled_scenario_with_invariants(capsys):
    code = main(["demo", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code in (0, None)
    runs = payload["runs"]
    assert {r["scenario"] for r in runs} == {"mixtral-8x7b-ep8", "deepseek-v3-ep64"}
    assert len(runs) == 4 and all(r["invariants_ok"] for r in runs)
    for name in ("mixtral-8x7b-ep8", "deepseek-v3-ep64"):
        base, bal = (r for r in runs if r["scenario"] == name)
        assert bal["placement"].startswith("balanced")
        # the balanced (EPLB-style) placement evens the GPU load out on the same routing
        assert bal["gpu_load_max_over_mean"] < base["gpu_load_max_over_mean"]
        assert base["finished"] == base["requests"] and bal["finished"] == bal["requests"]
        assert base["experts_s_per_step"] > 0 and bal["experts_s_per_step"] > 0


def test_demo_table_explains_a_slower_balanced_placement(capsys):
    assert main(["demo"]) in (0, None)
    out = capsys.readouterr().out
    assert out.count("-> balanced placement") == 2
    # Mixtral EP8 decode: two experts per GPU read more weights than the imbalance costs
    assert "slower here: expert GEMMs" in out
