"""The bad-input catalogue: each bad flag or file gives a clear error naming it, and nothing is
written (no --save-dir, no output file).

Covered elsewhere (not repeated here):
- world size not dividing the expert count: test_distributed.py::test_world_size_must_divide_experts,
  test_recipes.py::test_expert_count_that_does_not_fit_the_gpus_is_refused;
- partial routing without --task smlp_language_modeling, context window with partial routing,
  --sparse-layers out of range: test_smlp_model.py / test_cli_end_to_end.py;
- malformed zero-shot files (bad JSON line, missing field, bad label; file and line named):
  test_zeroshot.py::test_malformed_line_names_file_and_line and the tests after it;
- truncated or corrupted checkpoints: test_resume.py::test_truncated_checkpoint_is_named_in_the_error;
- c10d with sharded experts: test_distributed.py::test_c10d_with_sharded_experts_is_refused;
- a missing recipe data path: test_recipes.py::test_missing_data_is_refused_and_nothing_written;
- --smoe-experts not dividing the channels, --sparse-every < 0, a sequence longer than the spatial
  matrix in a forward call: test_smlp_model.py (model level; the CLI forms are below);
- bad --moe-experts / --moe-second-expert-policy values: test_baselines.py::test_bad_expert_count_names_the_flag;
- zero-shot --tasks / --dict / --path errors: test_zeroshot.py::test_cli_errors_name_the_flag,
  test_cli_missing_dict_is_a_clear_error.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

ENV = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
TRAIN = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy",
    "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--tmoe-ffn-embed-dim", "32", "--smoe-experts", "4", "--tmoe-experts", "2", "--tokens-per-sample", "32",
    "--max-tokens", "256", "--optimizer", "adam", "--lr", "0.001", "--cpu", "--num-workers", "0",
    "--required-batch-size-multiple", "1", "--disable-validation", "--no-epoch-checkpoints",
]


def fails(cmd, tmp_path):
    """Run `cmd`; it must fail, leave tmp_path as it was, and return its output."""
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    return out.stdout + out.stderr


def train(data_bin, save_dir, *extra):
    return ["fairseq-train", data_bin, *TRAIN, "--save-dir", save_dir, "--max-update", "2", *extra]


TRAIN_FLAGS = {
    "smoe experts not dividing the channels": (["--smoe-experts", "3"], "--smoe-experts 3 must divide the 32 channels"),
    "prefix ratio above 1": (["--smoe-routing", "partial", "--partial-prefix-ratio", "1.5"], "--partial-prefix-ratio must be in (0, 1), got 1.5"),
    "prefix ratio 0": (["--smoe-routing", "partial", "--partial-prefix-ratio", "0"], "--partial-prefix-ratio must be in (0, 1), got 0"),
    "unknown sMoE routing": (["--smoe-routing", "learned"], "argument --smoe-routing: invalid choice: 'learned'"),
    "unknown solver": (["--balanced-assignment", "hungarian"], "argument --balanced-assignment: invalid choice: 'hungarian'"),
    "fp16 on the CPU": (["--fp16"], "--fp16 needs a CUDA GPU"),
    "memory-efficient fp16 on the CPU": (["--memory-efficient-fp16"], "--memory-efficient-fp16 needs a CUDA GPU"),
    "memory-efficient bf16 on the CPU": (["--memory-efficient-bf16"], "--memory-efficient-bf16 (bf16 weights, no fp32 master copy) is not supported on the CPU"),
    "sequence longer than the spatial matrix": (
        ["--max-target-positions", "16"], "--tokens-per-sample 32 exceeds the model's 16 positions"),
    "tMoE experts 0": (["--tmoe-experts", "0"], "--tmoe-experts must be >= 1, got 0"),
    "unknown sMoE chunking": (["--smoe-chunk", "rows"], "argument --smoe-chunk: invalid choice: 'rows'"),
    "unknown partial balance": (
        ["--smoe-routing", "partial", "--partial-balance", "switch"], "argument --partial-balance: invalid choice: 'switch'"),
}


@pytest.mark.parametrize("case", list(TRAIN_FLAGS))
def test_bad_training_flag(data_bin, tmp_path, case):
    extra, message = TRAIN_FLAGS[case]
    log = fails(train(data_bin, tmp_path / "save", *extra), tmp_path)
    assert message in log
    assert not (tmp_path / "save").exists()


BASELINE_FLAGS = {
    "unknown token router": (["--arch", "switch_lm_tiny", "--moe-router", "top3"], "argument --moe-router: invalid choice: 'top3'"),
    "unknown hash type": (["--arch", "hash_lm_tiny", "--hash-type", "modulo"], "argument --hash-type: invalid choice: 'modulo'"),
    "top-2 with one expert": (["--arch", "gshard_lm_tiny", "--moe-experts", "1"], "--moe-experts must be at least 2 (each token goes to 2 experts), got 1"),
    "unknown second-expert policy": (
        ["--arch", "gshard_lm_tiny", "--moe-second-expert-policy", "best"], "argument --moe-second-expert-policy: invalid choice: 'best'"),
    "Transformer longer than its positions": (
        ["--arch", "switch_lm_tiny", "--max-target-positions", "16"], "--tokens-per-sample 32 exceeds the model's 16 positions"),
}


@pytest.mark.parametrize("case", list(BASELINE_FLAGS))
def test_bad_baseline_flag(data_bin, tmp_path, case):
    extra, message = BASELINE_FLAGS[case]
    cmd = ["fairseq-train", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
           "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "256", "--optimizer", "adam",
           "--lr", "0.001", "--cpu", "--max-update", "1", "--save-dir", tmp_path / "save", *extra]
    assert message in fails(cmd, tmp_path)
    assert not (tmp_path / "save").exists()


def test_missing_data_bin(tmp_path):
    log = fails(train(tmp_path / "no-such-data-bin", tmp_path / "save"), tmp_path)
    assert "no-such-data-bin" in log and not (tmp_path / "save").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_without_cuda_and_without_cpu_flag(data_bin, tmp_path):
    cmd = [c for c in train(data_bin, tmp_path / "save", "--fp16") if c != "--cpu"]
    assert "--fp16 needs a CUDA GPU" in fails(cmd, tmp_path)
    assert not (tmp_path / "save").exists()


@pytest.fixture(scope="module")
def checkpoint(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    out = subprocess.run(train(data_bin, save), cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return save / "checkpoint_last.pt"


def eval_lm(data, path, *extra):
    return ["fairseq-eval-lm", data, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
            "--path", path, "--cpu", "--gen-subset", "valid", *extra]


def test_eval_longer_than_the_spatial_matrix(data_bin, checkpoint, tmp_path):
    log = fails(eval_lm(data_bin, checkpoint, "--tokens-per-sample", "64"), tmp_path)
    assert "--tokens-per-sample 64" in log and "32" in log


def test_eval_with_another_dictionary(checkpoint, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("a completely different tiny corpus\nwith its own small dictionary\n" * 20)
    other = tmp_path / "other-bin"
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", text, "--validpref", text, "--destdir", other],
                   check=True, capture_output=True, env=ENV)
    log = fails(eval_lm(other, checkpoint, "--tokens-per-sample", "32"), tmp_path)
    assert "dictionary mismatch" in log and str(other / "dict.txt") in log


def test_bad_flag_leaves_an_existing_save_dir_untouched(data_bin, checkpoint, tmp_path):
    """Resuming into a --save-dir with a bad flag: the checkpoint there keeps its bytes and time."""
    save = tmp_path / "save"
    save.mkdir()
    last = save / "checkpoint_last.pt"
    last.write_bytes(checkpoint.read_bytes())
    before = (last.read_bytes(), last.stat().st_mtime_ns)
    for extra in (["--fp16"], ["--max-target-positions", "16"]):
        fails(train(data_bin, save, *extra), tmp_path)
    assert (last.read_bytes(), last.stat().st_mtime_ns) == before and sorted(save.iterdir()) == [last]


def test_eval_with_a_missing_data_bin(checkpoint, tmp_path):
    log = fails(eval_lm(tmp_path / "no-such-data-bin", checkpoint), tmp_path)
    assert str(tmp_path / "no-such-data-bin" / "dict.txt") in log


def test_zeroshot_malformed_task_file_writes_no_output(tmp_path):
    """Task files are read before the model is loaded: the bad line is named, --output never written."""
    data = tmp_path / "tasks"
    data.mkdir()
    good = {"premise": "It rained.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 0}
    (data / "copa.validation.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 2}) + "\n")
    log = fails([sys.executable, "-m", "fairseq_smlp.eval.zeroshot", "--path", tmp_path / "model.pt", "--tasks", "copa",
                 "--data-dir", data, "--cpu", "--output", tmp_path / "results.json"], tmp_path)
    assert "copa.validation.jsonl:2: field 'label' should be one of" in log
    assert not (tmp_path / "results.json").exists()


def test_reshard_to_an_impossible_world_size(checkpoint, tmp_path):
    log = fails([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", checkpoint, "--to-world-size", "3",
                 "--out", tmp_path / "out.pt"], tmp_path)
    assert "cannot be split over --to-world-size 3" in log


def test_reshard_to_world_size_zero(checkpoint, tmp_path):
    log = fails([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", checkpoint, "--to-world-size", "0",
                 "--out", tmp_path / "out.pt"], tmp_path)
    assert "--to-world-size must be >= 1" in log
