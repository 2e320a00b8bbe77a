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
    # bf16 autocast exactly where the CPU has bf16 units, and said so
    from fairseq_smlp.quickstart import native_bf16

    assert results["precision"] == ("bf16" if native_bf16() else "fp32")
    assert f"precision: {results['precision']} (" in out.stdout


def test_precision_auto_follows_the_cpu(monkeypatch, capsys):
    import torch

    from fairseq_smlp import quickstart

    for supported, flags in ((True, ["--bf16"]), (False, [])):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: supported)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: supported)
        assert quickstart.precision_flags("auto") == flags
        assert ("no bf16 matrix units" in capsys.readouterr().out) == (not supported)
    assert quickstart.precision_flags("fp32") == [] and quickstart.precision_flags("bf16") == ["--bf16"]
