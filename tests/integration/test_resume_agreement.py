"""Resume of expert-parallel runs: the ranks agree at load on the
newest update every rank saved, or all stop at once with an error naming each rank's files;
an explicit --restore-file that does not exist is an error naming it; a rank file's name on
disk is accepted. Two gloo workers (fairseq_smlp.distributed.launch_cpu), tMoE sharded."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from fairseq_smlp.checkpoints import rank_files
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

ARGS = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny",
    "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--tmoe-ffn-embed-dim", "16",
    "--smoe-experts", "2", "--tmoe-experts", "2", "--decoder-layers", "2", "--tokens-per-sample", "32",
    "--criterion", "moe_cross_entropy", "--dropout", "0.1", "--optimizer", "adam", "--lr", "0.003",
    "--max-tokens", "128", "--log-format", "json", "--log-interval", "1", "--no-epoch-checkpoints",
    "--seed", "3", "--num-workers", "0", "--required-batch-size-multiple", "1", "--disable-validation",
    "--save-interval-updates", "6",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMEOUT = 240  # a hang (ranks at different updates) fails here instead of blocking forever


def command(data_bin, save_dir, updates, *extra):
    return [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", "2", "--",
            "fairseq-train", str(data_bin), *ARGS, "--save-dir", str(save_dir), "--max-update", str(updates), *extra]


def run(cmd, ok=True):
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"still running after {TIMEOUT} s (ranks waiting on each other): {e.stdout and e.stdout[-2000:]}")
    log = out.stdout + out.stderr
    assert (out.returncode == 0) == ok, f"rc={out.returncode}\n{log[-4000:]}"
    return log


def losses(log):
    """{update: loss} of the train_inner lines (both ranks print the same; rank 0's kept)."""
    out = {}
    for line in log.splitlines():
        if "train_inner |" in line:
            entry = json.loads(line.split("| ", 3)[-1])
            out.setdefault(int(entry["num_updates"]), entry["loss"])
    return out


def model(path):
    return load_checkpoint_file(path)["model"]


@pytest.fixture(scope="module")
def runs(data_bin, tmp_path_factory):
    """reference: 18 updates uninterrupted; stopped: the same run stopped at 12 (interval
    checkpoints 6 and 12 on both ranks), trained side by side. Tests copy `stopped` before
    writing to it."""
    from conftest import finish, start_quietly

    root = tmp_path_factory.mktemp("agreement")
    started = [start_quietly(command(data_bin, root / name, updates), cwd=REPO, env=ENV) for name, updates in (("reference", 18), ("stopped", 12))]
    reference, stopped = (finish(process, timeout=2 * TIMEOUT) for process in started)  # independent: side by side
    for out in (reference, stopped):
        assert out.returncode == 0, out.stdout[-4000:]
    return root, losses(reference.stdout)


def copy_of(runs, tmp_path):
    return shutil.copytree(runs[0] / "stopped", tmp_path / "run")


def assert_continues_the_reference(runs, log, start, save):
    """Updates start+1..18 have the reference's losses and the final experts are the reference's."""
    resumed = losses(log)
    assert sorted(resumed) == list(range(start + 1, 19)), sorted(resumed)
    assert {u: runs[1][u] for u in resumed} == resumed
    for rank in range(2):
        name = f"checkpoint_last-rank-{rank}.pt"
        a, b = model(runs[0] / "reference" / name), model(save / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ranks_at_different_updates_resume_together_from_the_newest_common_one(runs, data_bin, tmp_path):
    """The state a kill -9 leaves: rank 0 saved update 12, rank 1 was killed before writing
    it (its checkpoint_last still at 6). Before: rank 0 resumed at 12, rank 1 at 6."""
    save = copy_of(runs, tmp_path)
    (save / "checkpoint_1_12-rank-1.pt").unlink()
    shutil.copyfile(save / "checkpoint_1_6-rank-1.pt", save / "checkpoint_last-rank-1.pt")
    log = run(command(data_bin, save, 18))
    assert "every rank resumes from update 6" in log
    assert "checkpoint_last-rank-0.pt @ update 12" in log and "checkpoint_last-rank-1.pt @ update 6" in log
    assert_continues_the_reference(runs, log, 6, save)


def test_an_interval_file_the_other_ranks_wrote_is_found(runs, data_bin, tmp_path):
    """Killed between writing checkpoint_1_12 and copying it onto checkpoint_last on rank 1:
    both resume from update 12 (rank 1 from its interval file)."""
    save = copy_of(runs, tmp_path)
    shutil.copyfile(save / "checkpoint_1_6-rank-1.pt", save / "checkpoint_last-rank-1.pt")
    log = run(command(data_bin, save, 18))
    assert "every rank resumes from update 12" in log
    assert_continues_the_reference(runs, log, 12, save)


def test_no_common_update_stops_every_rank_naming_their_files(runs, data_bin, tmp_path):
    save = copy_of(runs, tmp_path)
    for name in ("checkpoint_1_6-rank-1.pt", "checkpoint_1_12-rank-1.pt", "checkpoint_last-rank-1.pt"):
        (save / name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}
    log = run(command(data_bin, save, 18), ok=False)
    assert "the ranks' checkpoints hold no common update" in log
    assert "rank 0: checkpoint_last-rank-0.pt @ update 12, checkpoint_1_6-rank-0.pt @ update 6" in log
    assert "rank 1: no checkpoint" in log
    assert "Traceback" not in log  # a user error: one line per rank
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == before  # nothing overwritten


def test_a_rank_file_named_on_disk_resumes_every_rank_from_its_own(runs, data_bin, tmp_path):
    """--restore-file checkpoint_1_6-rank-0.pt (the name on disk) stands for checkpoint_1_6:
    rank 1 reads checkpoint_1_6-rank-1.pt. Before: '...-rank-0-rank-0.pt' not found, training
    from scratch over that rank's checkpoint_last."""
    save = copy_of(runs, tmp_path)
    log = run(command(data_bin, save, 18, "--restore-file", str(save / "checkpoint_1_6-rank-0.pt")))
    assert "Loaded checkpoint {} (epoch 1 @ 6 updates)".format(save / "checkpoint_1_6-rank-0.pt") in log  # rank 0's log
    assert_continues_the_reference(runs, log, 6, save)


def test_an_explicit_restore_file_that_does_not_exist_is_an_error(runs, data_bin, tmp_path):
    """Both ranks stop (no hang), nothing is overwritten. One process: test_fairseq_patches.py."""
    save = copy_of(runs, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in save.iterdir()}
    log = run(command(data_bin, save, 18, "--restore-file", str(save / "checkpoint_1_7.pt")), ok=False)
    assert f"--restore-file {save / 'checkpoint_1_7.pt'}: " in log and "does not exist" in log
    assert {p.name: p.stat().st_mtime_ns for p in save.iterdir()} == before


# ---------------------------------------------------------------- the decision alone
def test_agreement_rules():
    last = {12: "d/checkpoint_last-rank-0.pt", 6: "d/checkpoint_1_6-rank-0.pt"}
    assert rank_files.agree_on_update([last, {6: "d/checkpoint_last-rank-1.pt"}], "d") == 6
    assert rank_files.agree_on_update([{}, {}], "d") is None  # first launch
    with pytest.raises(rank_files.ResumeError, match=r"no common update.*\n  rank 0: checkpoint_last-rank-0.pt @ update 12, checkpoint_1_6-rank-0.pt @ update 6\n  rank 1: no checkpoint"):
        rank_files.agree_on_update([last, {}], "d")
    assert rank_files.strip_rank_suffix("/a/checkpoint_1_20-rank-13.pt") == "/a/checkpoint_1_20.pt"
    assert rank_files.strip_rank_suffix("/a-rank-1/checkpoint_last.pt") == "/a-rank-1/checkpoint_last.pt"
    with pytest.raises(rank_files.ResumeError, match="different updates"):
        rank_files.check_same_update([("a", 12), ("b", 6)], "--restore-file x")
