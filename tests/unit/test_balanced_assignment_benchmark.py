"""benchmarks/balanced_assignment.py: which problems take the warm start, and the table it writes."""
import json

from benchmarks import balanced_assignment


def test_benchmark_marks_the_warm_start_and_its_agreement(tmp_path):
    out = tmp_path / "ba"
    argv = ["--experts", "4", "16", "--items", "2048", "--partial", "256", "--model-experts", "16", "--repeats", "1"]
    balanced_assignment.main(argv + ["--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())["rows"]
    model_rows = [r for r in result if r["scores"] != "linear router"]
    assert [r["shape"] for r in model_rows] == [[2048, 16], [2048, 16]]  # smlp_lm_tiny's two tMoE layers
    assert all(r["warm_started"] and r["same"] for r in model_rows)
    rows = {tuple(r["shape"]): r for r in result if r["scores"] == "linear router"}
    assert set(rows) == {(2048, 4), (2048, 16), (32, 256, 4), (32, 256, 16)}
    warm = {shape for shape, r in rows.items() if r["warm_started"]}
    assert warm == {(2048, 16)}  # E >= 16 and N >= 2048 only
    assert all(r["same"] for r in rows.values())  # these problems all certify from zero prices too
    table = out.with_suffix(".md").read_text()
    assert "Command: `python -m benchmarks.balanced_assignment --experts 4 16" in table
    assert "| linear router | 1 x 2048, E = 16 | yes |" in table and "| linear router | 32 x 256, E = 16 | no |" in table
    assert "| smlp_lm_tiny tMoE 2, initialisation | 1 x 2048, E = 16 | yes |" in table
