"""The CPU launcher and its workers live and die together (issue 14, item 5): a launcher
killed with -9 or stopped with SIGTERM takes its workers with it, and the worker that failed
first is named by rank (the others only report gloo's 'Connection closed')."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

ENV = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
SLEEPER = ["python", "-c", "import time; time.sleep(300)"]  # a worker that would outlive the test


def start(*command, nprocs=2):
    return subprocess.Popen([sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", str(nprocs), "--", *command],
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def worker_pids(launcher, nprocs=2):
    """The workers' pids, from the launcher's 'launch_cpu: rank R is pid P' lines."""
    pids = {}
    while len(pids) < nprocs:
        line = launcher.stderr.readline()
        assert line, "the launcher ended before starting its workers"
        if line.startswith("launch_cpu: rank "):
            rank, pid = line.split()[2], line.split()[-1]
            pids[int(rank)] = int(pid)
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_gone(pids, seconds=10):
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_with_sigkill_takes_its_workers_with_it():
    """Before: the workers went on training, orphaned."""
    launcher = start(*SLEEPER)
    pids = worker_pids(launcher)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    left = wait_until_gone(pids.values())
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_sigterm_to_the_launcher_stops_the_workers():
    launcher = start(*SLEEPER)
    pids = worker_pids(launcher)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM
    assert "SIGTERM received, stopping the workers" in launcher.stderr.read()
    assert not wait_until_gone(pids.values(), seconds=1)


def test_the_first_worker_to_fail_is_named():
    code = "import sys, time; rank = sys.argv[sys.argv.index('--distributed-rank') + 1]; time.sleep(0.5); sys.exit(3 if rank == '1' else 0)"
    launcher = start("python", "-c", code)
    assert launcher.wait(timeout=60) == 3
    assert "launch_cpu: failed: worker rank 1 exited with code 3" in launcher.stderr.read()


def test_a_worker_killed_mid_training_is_named_and_the_other_stopped(data_bin, tmp_path):
    """Two real fairseq-train workers; rank 1 gets SIGKILL after the first checkpoint: rank 0
    fails in gloo, and the launcher's last line names rank 1 (before: nothing named it)."""
    launcher = start("fairseq-train", str(data_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
                     "--arch", "smlp_lm_tiny", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                     "--tmoe-ffn-embed-dim", "16", "--tmoe-experts", "2", "--smoe-experts", "2", "--decoder-layers", "2",
                     "--tokens-per-sample", "32", "--max-tokens", "128", "--optimizer", "adam", "--lr", "0.001",
                     "--criterion", "moe_cross_entropy", "--max-update", "100000", "--save-interval-updates", "3",
                     "--num-workers", "0", "--disable-validation", "--save-dir", str(tmp_path))
    pids = worker_pids(launcher)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoint_1_3-rank-1.pt").exists():
        assert launcher.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    os.kill(pids[1], signal.SIGKILL)
    assert launcher.wait(timeout=120) == 128 + signal.SIGKILL
    lines = [l for l in launcher.stderr.read().splitlines() if l.startswith("launch_cpu:")]
    assert lines[-1] == "launch_cpu: failed: worker rank 1 was killed by SIGKILL"
    assert not wait_until_gone(pids.values(), seconds=1)
