"""benchmarks/compare.py: the time-to-perplexity arithmetic, the table, and one short real run
through recipes/cpu_compare.sh (DRY_RUN)."""
import json
import math
import os
import subprocess

import pytest

from benchmarks import compare
from conftest import REPO


def curve(*pairs):
    return [{"seconds": s, "ppl": p, "tokens": 1000 * s, "updates": s} for s, p in pairs]


def test_time_to_reach_interpolates_between_validation_points():
    points = curve((10, 400.0), (20, 200.0), (30, 100.0))
    assert compare.time_to_reach(points, 300.0) == pytest.approx(15.0)
    assert compare.time_to_reach(points, 100.0) == pytest.approx(30.0)
    assert compare.time_to_reach(points, 500.0) == 10  # reached at the first point already
    assert compare.time_to_reach(points, 99.0) is None  # never reached


def fake_result():
    models = {
        "smlp": curve((60, 300.0), (120, 150.0)),
        "transformer": curve((60, 320.0), (120, 200.0)),
        "switch": curve((60, 350.0), (120, 250.0)),
    }
    for points in models.values():
        points[-1]["ppl_all_positions"] = points[-1]["ppl"] * 1.01
    return {
        "meta": {
            "command": "python -m benchmarks.compare", "machine": "x", "torch": "t", "threads": 1, "load_before": 0,
            "load_after": 0, "data": "d", "minutes": 2, "points": 2, "prefix": 25, "tokens_per_update": 2048,
            "valid_blocks": 8, "out": "/tmp/compare",
        },
        "models": {name: {"arch": f"{name}_lm_tiny", "params": 2e6, "params_active": 1e6, "flops_per_token": 3e6, "points": p}
                   for name, p in models.items()},
    }


def test_summary_finds_best_baseline_and_smlp_time_fraction():
    s = compare.summarize(fake_result())
    assert s["best_baseline"] == "transformer" and s["target_ppl"] == 200.0
    # smlp: 300 at 60 s, 150 at 120 s -> 200 at 60 + 60 * (100 / 150) = 100 s; transformer took 120 s
    assert s["rows"]["smlp"]["seconds_to_best_baseline"] == pytest.approx(100.0)
    assert s["smlp_time_fraction_of_best_baseline"] == pytest.approx(100.0 / 120.0)
    assert s["rows"]["transformer"]["time_ratio_to_smlp"] == pytest.approx(1.2)
    assert s["rows"]["switch"]["seconds_to_best_baseline"] is None
    assert s["rows"]["smlp"]["tokens_per_s"] == pytest.approx(1000.0)


def test_every_smlp_variant_gets_its_time_to_each_final_ppl():
    result = fake_result()
    result["models"]["smlp_top1"] = {**result["models"]["smlp"], "points": curve((60, 250.0), (120, 120.0))}
    rows = compare.summarize(result)["rows"]
    # switch ended at 250 after 120 s: smlp_top1 was there at 60 s (0.5), smlp at 60 + 60 * (50 / 150) = 80 s
    assert rows["switch"]["time_fractions"] == {"smlp": pytest.approx(80 / 120), "smlp_top1": pytest.approx(0.5)}
    # smlp ended at 150: smlp_top1 reached it at 60 + 60 * (100 / 130) s; no model is timed against itself
    assert rows["smlp"]["time_fractions"] == {"smlp_top1": pytest.approx((60 + 60 * 100 / 130) / 120)}


def test_markdown_table_lists_every_model_and_the_ratio(tmp_path):
    result = fake_result()
    result["summary"] = compare.summarize(result)
    compare.write_markdown(tmp_path / "t.md", result)
    text = (tmp_path / "t.md").read_text()
    for name in ("smlp", "transformer", "switch"):
        assert f"| {name} |" in text
    assert "not reached" in text  # switch
    assert "**0.83x**" in text
    assert "| 2.00M / 1.00M | 3.00M |" in text  # params total / active, FLOPs per token
    assert "the first 8 validation blocks" in text


def test_render_writes_json_table_and_plots_from_a_result(tmp_path):
    out = tmp_path / "compare"
    out.with_suffix(".json").write_text(json.dumps(fake_result()))
    compare.main(["--render", "--out", str(out)])
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["summary"]["best_baseline"] == "transformer"
    assert written["models"]["smlp"]["points"] == fake_result()["models"]["smlp"]["points"]
    assert "| smlp |" in out.with_suffix(".md").read_text()
    for suffix in ("time", "tokens"):
        assert (tmp_path / f"compare_ppl_vs_{suffix}.png").stat().st_size > 1000


@pytest.mark.slow
def test_cpu_compare_recipe_dry_run_trains_every_model_round_robin(data_bin, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "DATA_BIN": str(data_bin), "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(REPO / "recipes" / "cpu_compare.sh")], env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "+ python" in log and "dry run OK" in log
    (result_file,) = tmp_path.glob("*/compare.json")
    result = json.loads(result_file.read_text())
    assert set(result["models"]) == set(compare.MODELS)
    budget = 0.05 * 60  # DRY_RUN=1: MINUTES=0.05
    for name, m in result["models"].items():
        assert len(m["points"]) == 2  # POINTS=2: validated at half and all of its budget
        for k, point in enumerate(m["points"], start=1):
            # its own clock stopped at the first step boundary past k x budget / 2
            assert k * budget / 2 <= point["seconds"] <= k * budget / 2 + m["longest_step_seconds"] + 0.01
            assert math.isfinite(point["ppl"]) and point["ppl"] > 1
            assert ("ppl_all_positions" in point) == (name != "smlp_partial")
        assert m["points"][1]["updates"] > m["points"][0]["updates"] >= 1
        assert m["points"][1]["tokens"] > m["points"][0]["tokens"]
        assert m["params"] >= m["params_active"] > 0 and m["flops_per_token"] > 0
    # round-robin: every model's first validation came before any model's second
    first = [m["points"][0]["elapsed"] for m in result["models"].values()]
    second = [m["points"][1]["elapsed"] for m in result["models"].values()]
    assert max(first) <= min(second)
    assert result["meta"]["load_before"] >= 0 and result["meta"]["threads"] == 1
    assert result["meta"]["prefix"] > 0
    assert (result_file.parent / "compare_ppl_vs_time.png").stat().st_size > 1000
