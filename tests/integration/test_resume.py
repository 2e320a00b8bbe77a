"""Exact resume after `kill -9`: a real fairseq-train is killed mid-training, restarted with the
same command, and must reproduce the uninterrupted run (same seed): the same per-update losses
after the restart and bit-identical final parameters. Dropout is on, so RNG state matters;
router state, balanced assignment, Base layers' shuffling, hash tables and the data order must
all come back. Also: a crash while copying checkpoint_last.pt leaves it loadable, and a
truncated checkpoint is reported by name."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from fairseq_smlp.rehearse import train_losses
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

COMMON = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--criterion", "moe_cross_entropy",
    "--tokens-per-sample", "32", "--max-tokens", "256", "--required-batch-size-multiple", "1",
    "--optimizer", "adam", "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
    "--dropout", "0.1", "--seed", "3", "--num-workers", "0", "--cpu", "--disable-validation",
    "--log-format", "json", "--log-interval", "1", "--save-interval-updates", "4", "--no-epoch-checkpoints",
]
SMLP = ["--arch", "smlp_lm_tiny", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--tmoe-ffn-embed-dim", "32", "--smoe-experts", "4", "--tmoe-experts", "2"]
TRANSFORMER = ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2"]
FAMILIES = {
    "smlp": SMLP,
    "smlp_partial": SMLP + ["--smoe-routing", "partial"],
    "gmlp": ["--arch", "gmlp_lm_tiny", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64"],
    "transformer": ["--arch", "transformer_lm_tiny", *TRANSFORMER],
    "switch": ["--arch", "switch_lm_tiny", *TRANSFORMER, "--moe-experts", "2"],
    "gshard": ["--arch", "gshard_lm_tiny", *TRANSFORMER, "--moe-experts", "2"],
    "base": ["--arch", "base_lm_tiny", *TRANSFORMER],
    "hash": ["--arch", "hash_lm_tiny", *TRANSFORMER, "--moe-experts", "2"],
}
UPDATES, KILL_AFTER = 30, "checkpoint_1_8.pt"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_cmd(data_bin, save_dir, family_args, workers=1):
    cmd = ["fairseq-train", str(data_bin), *COMMON, *family_args, "--max-update", str(UPDATES), "--save-dir", str(save_dir)]
    if workers > 1:
        cmd = [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", str(workers), "--", *cmd]
    return cmd




def run(cmd):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}:\n{log[-4000:]}"
    return log


def start(cmd):
    """cmd started in the background (one thread): a reference run goes beside the run that is
    killed, which it does not depend on."""
    from conftest import start_quietly

    return start_quietly(cmd, cwd=REPO, env=ENV)


def log_of(process):
    from conftest import finish

    out = finish(process, timeout=600)
    assert out.returncode == 0, f"{' '.join(map(str, process.args))}:\n{out.stdout[-4000:]}"
    return out.stdout


def run_and_kill(cmd, save_dir, *markers):
    """Start `cmd`, SIGKILL its whole process group as soon as every save_dir/marker exists."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while not all((save_dir / marker).exists() for marker in markers):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def load_model(path):
    return load_checkpoint_file(path)["model"]


def assert_resume_is_exact(reference_log, resumed_log, reference_ckpt, resumed_ckpt):
    ref, resumed = train_losses(reference_log), train_losses(resumed_log)
    # restarted from checkpoint_last.pt: update 8, or 4 if the kill came before 8 was copied onto it
    assert resumed and max(resumed) == UPDATES and min(resumed) in (5, 9), sorted(resumed)
    assert {u: ref[u] for u in resumed} == resumed
    a, b = load_model(reference_ckpt), load_model(resumed_ckpt)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


ONE_PROCESS_CASES = {**FAMILIES, "smlp_bf16": SMLP + ["--bf16"]}


def kill_and_resume(data_bin, root, family_args):
    """(reference log, resumed log): a run killed with SIGKILL at update 8 and restarted with the
    same command, beside an uninterrupted reference run of the same command (saved under root)."""
    reference = start(train_cmd(data_bin, root / "ref", family_args))
    cmd = train_cmd(data_bin, root / "killed", family_args)
    run_and_kill(cmd, root / "killed", KILL_AFTER)
    return log_of(reference), run(cmd)  # the same command again: fairseq restores checkpoint_last.pt


@pytest.fixture(scope="module")
def resumed(data_bin, tmp_path_factory):
    """{case: (reference log, resumed log, root) or the exception it raised}: every one-process case,
    two cases at a time (each runs its reference beside its killed run)."""
    from concurrent.futures import ThreadPoolExecutor

    roots = {case: tmp_path_factory.mktemp(case) for case in ONE_PROCESS_CASES}

    def one(case):
        try:
            return (*kill_and_resume(data_bin, roots[case], ONE_PROCESS_CASES[case]), roots[case])
        except (AssertionError, OSError, subprocess.SubprocessError) as error:  # reported by that case's test
            return error

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(ONE_PROCESS_CASES, pool.map(one, ONE_PROCESS_CASES)))


def resumed_case(resumed, case):
    if isinstance(resumed[case], Exception):
        raise resumed[case]
    return resumed[case]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kill_9_and_restart_reproduces_the_run(resumed, family):
    reference, restarted, root = resumed_case(resumed, family)
    assert "Loaded checkpoint" in restarted
    assert_resume_is_exact(reference, restarted, root / "ref" / "checkpoint_last.pt", root / "killed" / "checkpoint_last.pt")


def test_kill_9_and_restart_reproduces_a_bf16_run(resumed):
    """--bf16 on the CPU (autocast, fp32 weights and optimizer state) resumes exactly too."""
    reference, restarted, root = resumed_case(resumed, "smlp_bf16")
    assert_resume_is_exact(reference, restarted, root / "ref" / "checkpoint_last.pt", root / "killed" / "checkpoint_last.pt")
    assert {t.dtype for t in load_model(root / "killed" / "checkpoint_last.pt").values()} <= {torch.float32, torch.int64}


def test_kill_9_two_workers_with_sharded_experts(data_bin, tmp_path):
    """Both gloo workers killed at once; each rank reloads its own experts (rank files).

    The ranks' checkpoint_last files can hold different updates after a kill (one rank had
    copied update 8 onto its checkpoint_last, the other not yet), and ranks resuming from
    different updates would wait on each other forever; so a multi-worker run resumes from the
    newest interval checkpoint that every rank wrote: --restore-file SAVE_DIR/checkpoint_1_8.pt
    (each rank reads its own checkpoint_1_8-rank-R.pt)."""
    reference = start(train_cmd(data_bin, tmp_path / "ref", SMLP, workers=2))
    cmd = train_cmd(data_bin, tmp_path / "killed", SMLP, workers=2)
    run_and_kill(cmd, tmp_path / "killed", *(KILL_AFTER.replace(".pt", f"-rank-{r}.pt") for r in range(2)))
    resumed = run(cmd + ["--restore-file", str(tmp_path / "killed" / KILL_AFTER)])
    reference = log_of(reference)
    for rank in range(2):
        name = f"checkpoint_last-rank-{rank}.pt"
        assert_resume_is_exact(reference, resumed, tmp_path / "ref" / name, tmp_path / "killed" / name)


def test_crash_while_copying_checkpoint_last_leaves_it_loadable(tmp_path, monkeypatch):
    """fairseq writes checkpoint_N.pt, then copies it onto checkpoint_last.pt: a crash in that
    copy must not truncate the old checkpoint_last.pt."""
    import shutil

    import fairseq_smlp  # noqa: F401  (installs the atomic copy)
    from fairseq.file_io import PathManager

    last, new = tmp_path / "checkpoint_last.pt", tmp_path / "checkpoint_1_8.pt"
    torch.save({"model": {"w": torch.ones(3)}}, last)
    torch.save({"model": {"w": torch.zeros(1000)}}, new)

    def crash_halfway(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(100))
        raise KeyboardInterrupt("killed while copying")

    monkeypatch.setattr(shutil, "copyfile", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(new), str(last), overwrite=True)
    assert torch.equal(torch.load(last)["model"]["w"], torch.ones(3))  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_8.pt", "checkpoint_last.pt"]  # no temp left
    monkeypatch.undo()
    assert PathManager.copy(str(new), str(last), overwrite=True)
    assert torch.equal(torch.load(last)["model"]["w"], torch.zeros(1000))


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("trained")
    run(["fairseq-train", str(data_bin), *COMMON, *SMLP, "--max-update", "4", "--save-dir", str(save)])
    return save


ENTRIES = ["eval-lm", "train-restore", "reshard", "zeroshot"]


@pytest.fixture(scope="module")
def truncated_runs(data_bin, trained, tmp_path_factory):
    """{entry point: (finished process, the truncated checkpoint, its folder's names before)}: each
    entry point handed half of a checkpoint in a folder of its own, all side by side."""
    from conftest import run_side_by_side

    data = (trained / "checkpoint_last.pt").read_bytes()
    folders, commands = {}, {}
    for entry in ENTRIES:
        folder = folders[entry] = tmp_path_factory.mktemp(entry)
        bad = folder / "checkpoint_last.pt"
        bad.write_bytes(data[: len(data) // 2])
        (folder / "zs").mkdir()
        (folder / "zs" / "copa.validation.jsonl").write_text(json.dumps(
            {"premise": "It rained.", "choice1": "We got wet.", "choice2": "We sang.", "question": "effect", "idx": 0, "label": 0}) + "\n")
        commands[entry] = {
            "eval-lm": ["fairseq-eval-lm", str(data_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
                        "--path", str(bad), "--tokens-per-sample", "32", "--cpu"],
            "train-restore": ["fairseq-train", str(data_bin), *COMMON, *SMLP, "--max-update", "6", "--save-dir", str(folder)],
            "reshard": [sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", str(bad), "--to-world-size", "1",
                        "--out", str(folder / "out.pt")],
            "zeroshot": [sys.executable, "-m", "fairseq_smlp.eval.zeroshot", "--path", str(bad), "--cpu", "--tasks", "copa",
                         "--data-dir", str(folder / "zs")],
        }[entry]
    before = {entry: sorted(p.name for p in folders[entry].iterdir()) for entry in ENTRIES}
    finished = run_side_by_side(commands, cwd=REPO, env=ENV)
    return {entry: (finished[entry], folders[entry] / "checkpoint_last.pt", before[entry]) for entry in ENTRIES}


@pytest.mark.parametrize("entry", ENTRIES)
def test_truncated_checkpoint_is_named_in_the_error(truncated_runs, entry):
    out, bad, before = truncated_runs[entry]
    assert out.returncode != 0
    assert f"checkpoint {bad}" in out.stdout + out.stderr and "truncated or corrupted" in out.stdout + out.stderr
    assert sorted(p.name for p in bad.parent.iterdir()) == before  # nothing written
