"""The bad-input catalogue, end to end through the real commands: each bad flag or file gives a
clear error naming it, and nothing is written (no --save-dir, no output file). The mechanisms
behind it are tested class by class, parametrised over every flag and file kind:
test_bad_numbers.py (the table of ranges), test_bad_files.py (the text reader),
test_bad_checkpoints.py (dictionary identity, reshard, interrupted saves); README "Bad input"
has the table.

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
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

ENV = dict(os.environ, OMP_NUM_THREADS="1")
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
    # numbers fairseq itself took: an embedding-only model, 2 of 1,735 blocks, a torch traceback
    "no blocks": (["--decoder-layers", "0"], "fairseq-train: error: --decoder-layers must be >= 1, got 0"),
    "batch smaller than a sample": (["--max-tokens", "16"], "fairseq-train: error: --max-tokens 16 is smaller than --tokens-per-sample 32"),
    "dropout above 1": (["--dropout", "1.5"], "fairseq-train: error: --dropout must be in [0, 1), got 1.5"),
    "clip norm nan": (["--clip-norm", "nan"], "fairseq-train: error: --clip-norm must be a finite number >= 0 (0: no clipping), got nan"),
    "sparse-every beyond the blocks": (["--sparse-every", "5"], "--sparse-every 5 with --decoder-layers 4 makes no block sparse"),
}


@pytest.mark.parametrize("case", list(TRAIN_FLAGS))
def test_bad_training_flag(bad_flag_runs, case):
    assert TRAIN_FLAGS[case][1] in failed_and_wrote_nothing(*bad_flag_runs["train", case])


BASELINE_FLAGS = {
    "unknown token router": (["--arch", "switch_lm_tiny", "--moe-router", "top3"], "argument --moe-router: invalid choice: 'top3'"),
    "unknown hash type": (["--arch", "hash_lm_tiny", "--hash-type", "modulo"], "argument --hash-type: invalid choice: 'modulo'"),
    "top-2 with one expert": (["--arch", "gshard_lm_tiny", "--moe-experts", "1"], "--moe-experts must be at least 2 (each token goes to 2 experts), got 1"),
    "unknown second-expert policy": (
        ["--arch", "gshard_lm_tiny", "--moe-second-expert-policy", "best"], "argument --moe-second-expert-policy: invalid choice: 'best'"),
    "Transformer longer than its positions": (
        ["--arch", "switch_lm_tiny", "--max-target-positions", "16"], "--tokens-per-sample 32 exceeds the model's 16 positions"),
}


def baseline_train(data_bin, save_dir, *extra):
    return ["fairseq-train", data_bin, "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
            "--criterion", "moe_cross_entropy", "--tokens-per-sample", "32", "--max-tokens", "256", "--optimizer", "adam",
            "--lr", "0.001", "--cpu", "--max-update", "1", "--save-dir", save_dir, *extra]


@pytest.fixture(scope="module")
def bad_flag_runs(data_bin, tmp_path_factory):
    """{(kind, case): (finished process, its empty folder)}: every bad-flag command, each with its
    --save-dir inside its own empty folder, each its own process forked from one that imported
    fairseq once (most of a failing command is start-up)."""
    from conftest import run_forked

    root = tmp_path_factory.mktemp("bad_flags")
    commands, folders = {}, {}
    for kind, cases, command in (("train", TRAIN_FLAGS, train), ("baseline", BASELINE_FLAGS, baseline_train)):
        for number, (case, (extra, _)) in enumerate(cases.items()):
            folders[kind, case] = root / f"{kind}{number}"
            folders[kind, case].mkdir()
            commands[kind, case] = command(data_bin, folders[kind, case] / "save", *extra)
    finished = run_forked(commands, cwd=REPO, env=ENV)
    return {key: (finished[key], folders[key]) for key in commands}


def failed_and_wrote_nothing(out, folder) -> str:
    """The output of a command that had to fail and leave its (empty) folder empty."""
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert not any(folder.rglob("*"))  # nothing written, the save dir not even made
    return out.stdout + out.stderr


@pytest.mark.parametrize("case", list(BASELINE_FLAGS))
def test_bad_baseline_flag(bad_flag_runs, case):
    assert BASELINE_FLAGS[case][1] in failed_and_wrote_nothing(*bad_flag_runs["baseline", case])


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


def test_eval_flags_checked_before_loading(data_bin, checkpoint, tmp_path):
    for extra, message in ((["--tokens-per-sample", "32", "--max-tokens", "16"], "--max-tokens 16 is smaller than --tokens-per-sample 32"),
                           (["--tokens-per-sample", "32", "--context-window", "32"], "--context-window 32 must be smaller than --tokens-per-sample 32")):
        log = fails(eval_lm(data_bin, checkpoint, *extra), tmp_path)
        assert f"fairseq-eval-lm: error: {message}" in log and "Traceback" not in log


def shuffled_data_bin(data_bin, tmp_path):
    """A data-bin of the same text whose dictionary has the same size but other words at
    most ids (the checkpoint's words, shuffled)."""
    import random

    tmp_path.mkdir(parents=True)
    lines = (data_bin / "dict.txt").read_text().splitlines()
    words = [line.split()[0] for line in lines]
    random.Random(0).shuffle(words)
    (tmp_path / "shuffled.txt").write_text("".join(f"{w} {line.split()[1]}\n" for w, line in zip(words, lines)))
    text = tmp_path / "text.txt"
    from conftest import ptb_lines

    text.write_text(ptb_lines("valid", 50))
    other = tmp_path / "other-bin"
    subprocess.run(["fairseq-preprocess", "--only-source", "--srcdict", tmp_path / "shuffled.txt", "--trainpref", text,
                    "--validpref", text, "--destdir", other], check=True, capture_output=True, env=ENV)
    return other


def test_checkpoint_records_its_dictionary(data_bin, checkpoint):
    from fairseq.data import Dictionary

    from fairseq_smlp.models.vocabulary import fingerprint

    state = load_checkpoint_file(checkpoint)
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    dictionary.pad_to_multiple_(8)  # as the language-modeling task does
    assert state["dictionary"] == fingerprint(dictionary)


def test_eval_with_same_size_other_words(data_bin, checkpoint, tmp_path):
    """Same size, other words: a plausible wrong perplexity before; now the first differences."""
    other = shuffled_data_bin(data_bin, tmp_path / "bin")
    log = fails(eval_lm(other, checkpoint, "--tokens-per-sample", "32"), tmp_path)
    last = [line for line in log.splitlines() if line.strip()][-1]
    assert last.startswith(f"fairseq-eval-lm: error: dictionary mismatch: the checkpoint was trained with another dictionary "
                           f"than {other / 'dict.txt'}")
    assert "entries differ, first (checkpoint vs here): #" in last and "Traceback" not in log


def test_resume_with_another_dictionary_names_it_last(data_bin, checkpoint, tmp_path):
    """fairseq turned the mismatch into "Cannot load model parameters ... architectures match"."""
    other = shuffled_data_bin(data_bin, tmp_path / "bin")
    save = tmp_path / "save"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes(checkpoint.read_bytes())
    out = subprocess.run([str(c) for c in train(other, save, "--max-update", "4")], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    last = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()][-1]
    assert out.returncode != 0 and last.startswith("fairseq-train: error: dictionary mismatch"), last
    assert "Traceback" not in out.stdout + out.stderr
    assert sorted(p.name for p in save.iterdir()) == ["checkpoint_last.pt"]


def reshard_cmd(*args):
    return [sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", *map(str, args)]


def test_reshard_keeps_the_optimizer_state_of_a_tied_single_process_checkpoint(checkpoint, tmp_path):
    """It was dropped, with a message blaming fp16 master weights; 1 -> 2 -> 1 now gives back
    the checkpoint, optimizer state included."""
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    first = subprocess.run(reshard_cmd(checkpoint, "--to-world-size", "2", "--out", tmp_path / "two.pt"), **run)
    assert first.returncode == 0 and "dropping" not in first.stdout + first.stderr, first.stdout + first.stderr
    subprocess.run(reshard_cmd(tmp_path / "two.pt", "--to-world-size", "1", "--out", tmp_path / "one.pt"), check=True, **run)
    a, b = (load_checkpoint_file(p) for p in (checkpoint, tmp_path / "one.pt"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    opt_a, opt_b = a["last_optimizer_state"], b["last_optimizer_state"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 10
    for i, entry in opt_a["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][k])) for k, v in entry.items())
    assert b["dictionary"] == a["dictionary"]


def test_reshard_refuses_rank_files_of_different_updates(checkpoint, tmp_path):
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    subprocess.run(reshard_cmd(checkpoint, "--to-world-size", "2", "--out", ranks / "last.pt"), check=True, capture_output=True, cwd=REPO, env=ENV)
    late = load_checkpoint_file(ranks / "last-rank-1.pt", mmap=False)  # saved over below
    late["optimizer_history"][-1]["num_updates"] += 3  # as if rank 1 saved 3 updates later
    torch.save(late, ranks / "last-rank-1.pt")
    log = fails(reshard_cmd(ranks / "last.pt", "--to-world-size", "1", "--out", tmp_path / "merged.pt"), tmp_path)
    assert f"{ranks / 'last-rank-0.pt'}: update 2, {ranks / 'last-rank-1.pt'}: update 5" in log


def test_nan_in_training_is_the_last_line_and_crash_pt_is_saved(data_bin, tmp_path):
    """A router reached by NaN stops training with its layer's name; the crash save into a save
    dir that did not exist yet must not bury it."""
    save = tmp_path / "not" / "yet"
    cmd = [c if c != "0.001" else "1e30" for c in train(data_bin, save, "--max-update", "20")]  # --lr 1e30: diverges
    out = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    last = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()][-1]
    assert out.returncode != 0 and last.startswith("FloatingPointError: non-finite router logits in layers."), last
    assert (save / "crash.pt").is_file() and not list(save.glob("*.tmp"))


def test_reshard_to_an_impossible_world_size(checkpoint, tmp_path):
    log = fails([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", checkpoint, "--to-world-size", "3",
                 "--out", tmp_path / "out.pt"], tmp_path)
    assert "cannot be split over --to-world-size 3" in log


def test_reshard_to_world_size_zero(checkpoint, tmp_path):
    log = fails([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", checkpoint, "--to-world-size", "0",
                 "--out", tmp_path / "out.pt"], tmp_path)
    assert "--to-world-size must be >= 1, got 0" in log


def test_reshard_into_a_missing_folder_is_refused_before_reading(tmp_path):
    log = fails(reshard_cmd(tmp_path / "any.pt", "--to-world-size", "1", "--out", tmp_path / "no" / "out.pt"), tmp_path)
    assert f"--out {tmp_path / 'no' / 'out.pt'}: folder {tmp_path / 'no'} does not exist" in log
