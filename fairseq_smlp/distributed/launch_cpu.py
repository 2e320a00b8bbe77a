"""Start N CPU workers of a fairseq command with the gloo backend.

    python -m fairseq_smlp.distributed.launch_cpu --nprocs 2 -- fairseq-train DATA --user-dir fairseq_smlp ...

fairseq's own launcher refuses CPU-only machines and torchrun divides by the CUDA device
count, so this starts one process per rank itself and hands each fairseq's own options:
--cpu --distributed-world-size N --distributed-rank R --distributed-backend gloo
--distributed-init-method file:///tmp/launch_cpu-XXXX/rendezvous --distributed-no-spawn
--device-id 0 --ddp-backend legacy_ddp (unless the command sets --ddp-backend).

Nothing listens beyond this machine: the workers meet through a file in a private folder
(mkdtemp, mode 0700, removed at the end) instead of a TCP store (which torch binds to every
interface, unauthenticated, while the workers exchange pickled objects), and gloo connects
them over the loopback interface only (GLOO_SOCKET_IFNAME). No port is chosen, so none can be
taken between choosing and binding it. --port is accepted for old scripts and ignored.

The launcher and its workers live and die together:
- the first worker to fail is named (rank, pid, exit code or signal) and the others are
  stopped (instead of waiting forever in a collective; their "Connection closed" errors from
  gloo follow from it); its exit status is returned (128 + signal for a killed worker);
- SIGTERM / SIGINT / SIGHUP to the launcher stop the workers first (the handlers are in place
  before the first worker starts; "launch_cpu: ready" says every worker has started);
- a launcher killed with SIGKILL takes the workers with it (Linux: PR_SET_PDEATHSIG).
On GPUs use torchrun / SLURM with NCCL as usual (see README).
"""
import argparse
import ctypes
import ctypes.util
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from ..validation import check_args


PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def loopback_interface() -> str:
    """The loopback interface's name (lo on Linux, lo0 on BSD / macOS), for gloo."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    return next((n for n in ("lo", "lo0") if n in names), "lo")


def worker_command(command, nprocs: int, rank: int, init_method: str):
    extra = [
        "--cpu", "--distributed-world-size", str(nprocs), "--distributed-rank", str(rank),
        "--distributed-backend", "gloo", "--distributed-init-method", init_method,
        "--distributed-no-spawn", "--device-id", "0",
    ]
    if not any(a == "--ddp-backend" or a.startswith("--ddp-backend=") for a in command):
        extra += ["--ddp-backend", "legacy_ddp"]  # the one that keeps expert gradients local
    return list(command) + extra


def worker_env(nprocs: int):
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))  # no oversubscription
    env["GLOO_SOCKET_IFNAME"] = loopback_interface()  # gloo's connections on loopback only
    return env


def die_with_parent(parent: int):
    """preexec_fn of a worker: SIGKILL when the launcher dies, however it dies (Linux only;
    elsewhere the signal handlers below cover all but SIGKILL)."""

    def preexec():
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def how_it_ended(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # a shell's convention for a killed process


class Workers:
    """The worker processes of one launch; stop() ends those still running."""

    def __init__(self):
        self.procs = []

    def start(self, command, nprocs: int, init_method: str, stop_requested) -> None:
        """Start the ranks one by one, none more once `stop_requested()` is true."""
        parent = os.getpid()
        for rank in range(nprocs):
            if stop_requested():
                return
            cmd = worker_command(command, nprocs, rank, init_method)
            self.procs.append(subprocess.Popen(cmd, env=worker_env(nprocs), preexec_fn=die_with_parent(parent)))
            print(f"launch_cpu: rank {rank} is pid {self.procs[-1].pid}", file=sys.stderr, flush=True)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the running workers, SIGKILL to those still there after `grace` seconds."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def first_failure(self):
        """(rank, code) of the worker that failed first, or None. Several found failed at once:
        one killed by a signal is the cause (the others' collectives failed because of it)."""
        failed = [(r, p.returncode) for r, p in enumerate(self.procs) if p.poll() not in (None, 0)]
        if not failed:
            return None
        return min(failed, key=lambda f: (f[1] >= 0, f[0]))


def report_failure(workers: Workers, rank: int, code: int) -> int:
    """Name the first worker that failed, stop the others, return its exit status."""
    running = [str(r) for r, p in enumerate(workers.procs) if p.poll() is None]
    stopping = f"; stopping rank(s) {', '.join(running)}" if running else ""
    print(f"launch_cpu: worker rank {rank} (pid {workers.procs[rank].pid}) {how_it_ended(code)}{stopping}: "
          "the other workers' errors (e.g. gloo's 'Connection closed') follow from it", file=sys.stderr, flush=True)
    workers.stop()
    print(f"launch_cpu: failed: worker rank {rank} {how_it_ended(code)}", file=sys.stderr, flush=True)
    return exit_status(code)


def stop_on_signal(workers: Workers, signum: int) -> int:
    """A stop signal to the launcher: the workers end first, then the launcher with 128 + signal."""
    print(f"launch_cpu: {signal.Signals(signum).name} received, stopping the workers", file=sys.stderr, flush=True)
    workers.stop()
    return 128 + signum


def supervise(workers: Workers, received: list) -> int:
    """Wait for the workers; the first failure or stop signal ends them all."""
    while True:
        if received:
            return stop_on_signal(workers, received[0])
        failure = workers.first_failure()
        if failure is not None:
            return report_failure(workers, *failure)
        if all(p.poll() == 0 for p in workers.procs):
            return 0
        time.sleep(0.2)


def launch(command, nprocs: int, port: int = 0) -> int:
    """Run `command` as `nprocs` gloo ranks meeting through a private file; returns the exit status.

    The stop signals only set a flag, and their handlers are installed before the first worker
    starts: a signal at any moment, even while the workers are being started, stops them all."""
    if port:
        print(f"launch_cpu: --port {port} is ignored: the workers meet through a file in a private folder",
              file=sys.stderr, flush=True)
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in STOP_SIGNALS}
    rendezvous = tempfile.mkdtemp(prefix="launch_cpu-")  # mode 0700: no other user can read or plant the store
    workers = Workers()
    try:
        workers.start(command, nprocs, f"file://{os.path.join(rendezvous, 'rendezvous')}", lambda: bool(received))
        if not received:
            print(f"launch_cpu: ready: {nprocs} worker(s) started; SIGTERM, SIGINT or SIGHUP stops them",
                  file=sys.stderr, flush=True)
        return supervise(workers, received)
    finally:
        workers.stop()  # only workers still running (an error in the launcher itself)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(rendezvous, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python -m fairseq_smlp.distributed.launch_cpu --nprocs N -- fairseq-train ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m fairseq_smlp.distributed.launch_cpu")
    parser.add_argument("--nprocs", type=int, required=True, help="number of CPU workers (data-parallel ranks)")
    parser.add_argument(
        "--port", type=int, default=0, help="ignored (kept for old scripts): the workers meet through a file"
    )
    args = parser.parse_args(argv[:split])
    check_args(parser, args)
    return launch(argv[split + 1 :], args.nprocs, args.port)


if __name__ == "__main__":
    sys.exit(main())
