"""The main job of README's first command, end to end on a tiny budget: corpus preparation,
fairseq-train, fairseq-eval-lm on valid and test, results.json."""
import json
import math
import subprocess

from conftest import REPO


def test_quickstart_runs_end_to_end(tmp_path):
    out = subprocess.run(["fairseq-smlp-quickstart", "--minutes", "0.05", "--out-dir", str(tmp_path / "qs")],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert results["arch"] == "smlp_lm_tiny" and results["params"] == 2_375_680
    for key in ("valid_ppl", "test_ppl"):
        assert math.isfinite(results[key]) and results[key] > 1
    assert f"test perplexity:       {results['test_ppl']:.2f}" in out.stdout
    assert (tmp_path / "qs" / "checkpoints" / "checkpoint_best.pt").exists()
