"""The main job of README's first command, end to end on a tiny budget: corpus preparation,
fairseq-train, fairseq-eval-lm on valid and test, results.json."""
import json
import math
import subprocess
import sys

import pytest

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


# ------------------------------------------------------------------ bad input to the quickstart
def quickstart_exit(argv):
    from fairseq_smlp import quickstart

    with pytest.raises(SystemExit) as e:
        quickstart.main(argv)
    return str(e.value.code)


def test_an_out_dir_of_another_configuration_is_named(tmp_path):
    """Re-running into the same --out-dir with another --arch failed with "command failed" and
    the reason in a log."""
    from fairseq_smlp import quickstart

    out = tmp_path / "qs"
    out.mkdir()
    args = quickstart.parse_args(["--out-dir", str(out)])
    (out / quickstart.RUN_FILE).write_text(json.dumps(quickstart.run_config(args, [])))
    message = quickstart_exit(["--out-dir", str(out), "--arch", "gmlp_lm_tiny", "--", "--dropout", "0.3"])
    assert message.startswith(f"fairseq-smlp-quickstart: error: --out-dir {out} holds a run of another configuration")
    assert "arch: 'smlp_lm_tiny' there, 'gmlp_lm_tiny' now" in message and "fairseq_options: [] there, ['--dropout', '0.3'] now" in message
    (out / quickstart.RUN_FILE).unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "checkpoint_last.pt").write_bytes(b"x")
    assert "holds checkpoints of a run with no run.json" in quickstart_exit(["--out-dir", str(out)])
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoint_last.pt", "checkpoints"]
    assert quickstart_exit(["--out-dir", str(out / "checkpoints" / "checkpoint_last.pt")]).endswith("is a file, not a folder")


def test_task_options_after_dash_dash_reach_evaluation(tmp_path):
    """-- --tokens-per-sample 64 trained on 64-token blocks and then evaluated on 128."""
    from fairseq_smlp import quickstart

    extra = ["--tokens-per-sample", "64", "--lr", "0.01", "--sample-break-mode", "eos", "--dropout", "0.3"]
    cmd = quickstart.eval_command(tmp_path, tmp_path, "valid", [], extra)
    assert cmd[-4:] == ["--tokens-per-sample", "64", "--sample-break-mode", "eos"] and "--lr" not in cmd
    assert quickstart.train_command(quickstart.parse_args([]), tmp_path, tmp_path, [], extra)[-len(extra):] == extra


def test_bad_fairseq_option_fails_before_the_corpus_is_prepared(tmp_path):
    out = tmp_path / "qs"
    message = quickstart_exit(["--out-dir", str(out), "--", "--max-tokens", "16"])
    assert message == ("fairseq-smlp-quickstart: error: --max-tokens 16 is smaller than --tokens-per-sample 128: no full-length "
                       "sample fits in a batch (fairseq would skip them and train or score on the rest); raise --max-tokens "
                       "to at least 128 or lower --tokens-per-sample")
    assert not out.exists()


def test_bad_text_file_is_named(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a b c\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a b\n\xff\n")
    message = quickstart_exit(["--out-dir", str(tmp_path / "qs"), "--train", str(bad), "--valid", str(good), "--test", str(good)])
    assert message == f"fairseq-smlp-quickstart: error: --train {bad}:2: not UTF-8: byte b'\\xff' at byte offset 4 (invalid start byte)"
    assert not (tmp_path / "qs").exists()


def test_a_failed_command_prints_its_own_error_last(capsys):
    from fairseq_smlp import quickstart

    script = "import sys; print('INFO starting'); print('Traceback (most recent call last):'); print('  File x'); sys.exit('ValueError: the cause')"
    with pytest.raises(SystemExit) as e:
        quickstart.run([sys.executable, "-c", script])
    assert str(e.value.code).splitlines()[-1] == "ValueError: the cause"


def test_a_tiny_budget_is_not_rounded_to_no_limit():
    from fairseq_smlp import quickstart

    cmd = quickstart.train_command(quickstart.parse_args(["--minutes", "0.001"]), "DATA", "SAVE", [], [])
    assert float(cmd[cmd.index("--stop-time-hours") + 1]) == 0.001 / 60
