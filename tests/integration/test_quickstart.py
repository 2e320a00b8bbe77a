"""The main job of README's first command, end to end on a tiny budget: corpus preparation,
fairseq-train, fairseq-eval-lm on valid and test, results.json."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


# a short warm-up, so that 30 updates train a model whose perplexity a stale or untrained one cannot reach
QUICK_OPTIONS = ["--warmup-updates", "10"]
QUICK_UPDATES = 30  # the reference: tests/quality_reference.json "quickstart" (python tests/integration/test_quality.py --write-quickstart)


def quickstart_command(out_dir, precision):
    return ["fairseq-smlp-quickstart", "--minutes", "20", "--out-dir", str(out_dir), "--precision", precision,
            "--", "--max-update", str(QUICK_UPDATES), *QUICK_OPTIONS]


def quickstart(out_dir, precision):
    return subprocess.run(quickstart_command(out_dir, precision), cwd=REPO, capture_output=True, text=True, timeout=1200)


def auto_and_other():
    """{"auto": the precision `--precision auto` picks on this CPU, "the other": the other one}."""
    from fairseq_smlp.quickstart import native_bf16

    auto = "bf16" if native_bf16() else "fp32"
    return {"auto": auto, "the other": {"bf16": "fp32", "fp32": "bf16"}[auto]}


@pytest.fixture(scope="module")
def quickstarts(tmp_path_factory):
    """{choice: (finished process, out dir)}: both precisions' quickstarts side by side, one
    thread each (on two cores, about the wall-clock of one)."""
    from conftest import finish, start_quietly

    root = tmp_path_factory.mktemp("quickstarts")
    out_dirs = {choice: root / choice.replace(" ", "_") for choice in ("auto", "the other")}
    started = {choice: start_quietly(quickstart_command(out_dirs[choice], "auto" if choice == "auto" else precision), cwd=REPO)
               for choice, precision in auto_and_other().items()}
    return {choice: (finish(process), out_dirs[choice]) for choice, process in started.items()}


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["auto", "the other"])
def test_quickstart_trains_a_model_as_good_as_a_measured_run(quickstarts, choice):
    """README's main command at a tiny fixed number of updates, in the precision auto picks on
    this CPU and in the other one: perplexity within 15% of a measured good run's, the one
    printed equal to results.json, eval-lm's equal to training's own validation."""
    from fairseq_smlp.quickstart import summary
    from test_quality import TOLERANCE, reference

    precision = auto_and_other()[choice]
    out, out_dir = quickstarts[choice]
    assert out.returncode == 0, out.stdout[-6000:]
    results = json.loads((out_dir / "results.json").read_text())
    assert results["arch"] == "smlp_lm_tiny" and results["params"] == 2_375_680 and results["updates"] == QUICK_UPDATES
    assert results["precision"] == precision
    if choice == "auto":
        assert f"precision: {precision} (" in out.stdout  # said why
    good = reference("quickstart")[precision]
    for key in ("valid_ppl", "test_ppl"):
        assert good[key] * (1 - TOLERANCE) <= results[key] <= good[key] * (1 + TOLERANCE), (key, results[key], good[key])
    assert abs(results["valid_ppl"] - results["best_training_valid_ppl"]) < 0.005 * results["valid_ppl"]
    assert {"date", "commit", "machine", "torch"} <= set(results)
    assert summary(results) in out.stdout
    assert (out_dir / "checkpoints" / "checkpoint_best.pt").exists()


def test_readme_shows_the_committed_quickstart_results():
    """README's expected output is the committed measurements' (python -m benchmarks.readme_quickstart
    writes it), never typed by hand."""
    from benchmarks import readme_quickstart

    for precision in ("bf16", "fp32"):
        assert readme_quickstart.results(precision)["precision"] == precision
    readme = (REPO / "README.md").read_text()
    assert readme_quickstart.readme_block(readme) == readme_quickstart.block()


def test_a_quickstart_whose_checkpoint_disagrees_with_training_stops(capsys):
    from fairseq_smlp import quickstart

    quickstart.check_agreement(125.3, 125.0)
    with pytest.raises(SystemExit) as e:
        quickstart.check_agreement(1520.0, 401.89)
    assert "scores checkpoint_best.pt at validation perplexity 1520.00, but training validated it at 401.89" in str(e.value.code)


def test_training_validations_are_read_from_fairseqs_log():
    from fairseq_smlp import quickstart

    log = ("epoch 001 | valid on 'valid' subset | loss 8.65 | nll_loss 8.65 | ppl 401.89 | wps 1 | wpb 2 | bsz 3 | "
           "num_updates 200\n"  # fairseq's first validation: no best yet
           "epoch 002 | valid on 'valid' subset | loss 8.7 | nll_loss 8.7 | ppl 415.9 | wps 1 | wpb 2 | bsz 3 | "
           "num_updates 400 | best_loss 8.65\n")
    found = quickstart.training_validations(log)
    assert [(u, p) for u, p, _ in found] == [(200, 401.89), (400, 415.9)]
    assert found[-1][2] == pytest.approx(2 ** 8.65)


def test_a_truncated_run_record_is_named(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    (out / "run.json").write_text('{"arch": "smlp')
    message = quickstart_exit(["--out-dir", str(out)])
    assert message.startswith(f"fairseq-smlp-quickstart: error: {out / 'run.json'} is not a readable run record")


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
