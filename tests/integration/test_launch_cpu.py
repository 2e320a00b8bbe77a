"""The CPU launcher and its workers live and die together: a launcher
killed with -9 or stopped with SIGTERM takes its workers with it, and the worker that failed
first is named by rank (the others only report gloo's 'Connection closed'). Nothing they
open listens beyond loopback."""
import glob
import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1")
SLEEPER = ["python", "-c", "import time; time.sleep(300)"]  # a worker that would outlive the test


def start(*command, nprocs=2):
    return subprocess.Popen([sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", str(nprocs), "--", *command],
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def worker_pids(launcher):
    """The workers' pids, from the launcher's 'launch_cpu: rank R is pid P' lines, read up to
    its 'launch_cpu: ready' line (from then on its stop signals are handled: no sleep needed)."""
    pids = {}
    while True:
        line = launcher.stderr.readline()
        assert line, f"the launcher ended before it was ready (exit {launcher.poll()})"
        if line.startswith("launch_cpu: rank "):
            rank, pid = line.split()[2], line.split()[-1]
            pids[int(rank)] = int(pid)
        if line.startswith("launch_cpu: ready"):
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


def test_sigterm_while_the_workers_start_stops_those_started():
    """The handlers are installed before the first worker starts (a SIGTERM that came
    between the start and the handler killed the launcher alone, exit -15, workers orphaned)."""
    launcher = start(*SLEEPER, nprocs=8)
    first = ""
    while not first.startswith("launch_cpu: rank 0 is pid"):
        first = launcher.stderr.readline()
        assert first, "the launcher ended before starting a worker"
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    rest = launcher.stderr.read()
    pids = [int(first.split()[-1])] + [int(l.split()[-1]) for l in rest.splitlines() if l.startswith("launch_cpu: rank ")]
    assert "SIGTERM received, stopping the workers" in rest
    assert not wait_until_gone(pids, seconds=1)


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


GLOO_WORKER = """
import sys, time, torch, torch.distributed as dist
arg = lambda name: sys.argv[sys.argv.index(name) + 1]
dist.init_process_group("gloo", init_method=arg("--distributed-init-method"),
                        world_size=int(arg("--distributed-world-size")), rank=int(arg("--distributed-rank")))
t = torch.ones(1)
dist.all_reduce(t)
open(sys.argv[1] + "." + arg("--distributed-rank"), "w").write(str(t.item()))
time.sleep(300)
"""


def socket_inodes(pid):
    """The inodes of the sockets process `pid` holds open."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def proc_address(hex_address):
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    address = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(address)


def is_loopback(address):
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def tcp_sockets(pid):
    """(local address, state, is listening) of every TCP socket process `pid` holds."""
    inodes, found = socket_inodes(pid), []
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    found.append((proc_address(fields[1].split(":")[0]), fields[3] == "0A"))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="reads Linux's /proc/net/tcp")
def test_the_workers_listen_on_loopback_only(tmp_path):
    """Two gloo ranks started as the launcher starts fairseq (its init method, its environment)
    and connected by an all_reduce: none of their TCP sockets, listening or connected, and none
    of the launcher's, has a non-loopback address (before: the TCP store listened on *:PORT)."""
    marker = tmp_path / "reduced"
    launcher = start("python", "-c", GLOO_WORKER, str(marker))
    try:
        pids = worker_pids(launcher)
        deadline = time.time() + 120
        while not all((tmp_path / f"reduced.{r}").exists() for r in pids):
            assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read() if launcher.poll() is not None else "no all_reduce"
            time.sleep(0.2)
        assert {(tmp_path / f"reduced.{r}").read_text() for r in pids} == {"2.0"}
        sockets = {pid: tcp_sockets(pid) for pid in [launcher.pid, *pids.values()]}
        assert any(sockets[pid] for pid in pids.values()), "gloo's connections were not found: the check would see nothing"
        outside = {pid: [(str(a), listening) for a, listening in found if not is_loopback(a)] for pid, found in sockets.items()}
        assert not any(outside.values()), outside
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)


def test_the_rendezvous_folder_is_private_and_removed(tmp_path, monkeypatch):
    """The file store lives in a mkdtemp folder (mode 0700) that the launcher removes at the end."""
    import tempfile

    from fairseq_smlp.distributed import launch_cpu

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = tmp_path / "seen"
    code = "import os, sys; f = sys.argv[sys.argv.index('--distributed-init-method') + 1][len('file://'):]; " \
           "d = os.path.dirname(f); open(sys.argv[1], 'w').write(f'{d} {oct(os.stat(d).st_mode & 0o777)} {os.environ[\"GLOO_SOCKET_IFNAME\"]}')"
    assert launch_cpu.launch([sys.executable, "-c", code, str(seen)], nprocs=1) == 0
    folder, mode, interface = seen.read_text().split()
    assert os.path.dirname(folder) == str(tmp_path) and mode == "0o700" and interface in ("lo", "lo0")
    assert not os.path.exists(folder)
