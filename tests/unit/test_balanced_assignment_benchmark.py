"""benchmarks/balanced_assignment.py: which problems take the warm start, and the table it writes."""
import json

from benchmarks import balanced_assignment


def test_benchmark_marks_the_warm_start_and_its_agreement(tmp_path):
    out = tmp_path / "ba"
    balanced_assignment.main(["--experts", "4", "16", "--items", "2048", "--partial", "256", "--repeats", "1", "--out", str(out)])
    rows = {tuple(r["shape"]): r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {(2048, 4), (2048, 16), (32, 256, 4), (32, 256, 16)}
    warm = {shape for shape, r in rows.items() if r["warm_started"]}
    assert warm == {(2048, 16)}  # E >= 16 and N >= 2048 only
    assert all(r["same"] for r in rows.values())  # these problems all certify from zero prices too
    table = out.with_suffix(".md").read_text()
    assert "Command: `python -m benchmarks.balanced_assignment --experts 4 16" in table
    assert "| 1 x 2048, E = 16 | yes |" in table and "| 32 x 256, E = 16 | no |" in table
