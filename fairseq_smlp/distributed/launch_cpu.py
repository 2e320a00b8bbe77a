"""Start N CPU workers of a fairseq command with the gloo backend.

    python -m fairseq_smlp.distributed.launch_cpu --nprocs 2 -- fairseq-train DATA --user-dir fairseq_smlp ...

fairseq's own launcher refuses CPU-only machines and torchrun divides by the CUDA device
count, so this starts one process per rank itself and hands each fairseq's own options:
--cpu --distributed-world-size N --distributed-rank R --distributed-backend gloo
--distributed-init-method tcp://127.0.0.1:PORT --distributed-no-spawn --device-id 0
--ddp-backend legacy_ddp (unless the command sets --ddp-backend).

The launcher and its workers live and die together:
- the first worker to fail is named (rank, pid, exit code or signal) and the others are
  stopped (instead of waiting forever in a collective; their "Connection closed" errors from
  gloo follow from it); its exit status is returned (128 + signal for a killed worker);
- SIGTERM / SIGINT / SIGHUP to the launcher stop the workers first;
- a launcher killed with SIGKILL takes the workers with it (Linux: PR_SET_PDEATHSIG).
On GPUs use torchrun / SLURM with NCCL as usual (see README).
"""
import argparse
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time

from ..validation import check_args


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(command, nprocs: int, rank: int, port: int):
    extra = [
        "--cpu", "--distributed-world-size", str(nprocs), "--distributed-rank", str(rank),
        "--distributed-backend", "gloo", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
        "--distributed-no-spawn", "--device-id", "0",
    ]
    if not any(a == "--ddp-backend" or a.startswith("--ddp-backend=") for a in command):
        extra += ["--ddp-backend", "legacy_ddp"]  # the one that keeps expert gradients local
    return list(command) + extra


def worker_env(nprocs: int):
    env = dict(os.environ)
    env.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # fairseq checkpoints hold omegaconf objects
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))  # no oversubscription
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

    def __init__(self, command, nprocs: int, port: int):
        parent = os.getpid()
        self.procs = [
            subprocess.Popen(worker_command(command, nprocs, r, port), env=worker_env(nprocs), preexec_fn=die_with_parent(parent))
            for r in range(nprocs)
        ]
        for rank, p in enumerate(self.procs):
            print(f"launch_cpu: rank {rank} is pid {p.pid}", file=sys.stderr, flush=True)

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


def launch(command, nprocs: int, port: int = 0) -> int:
    port = port or free_port()
    workers = Workers(command, nprocs, port)

    def on_signal(signum, frame):
        print(f"launch_cpu: {signal.Signals(signum).name} received, stopping the workers", file=sys.stderr, flush=True)
        workers.stop()
        sys.exit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            failure = workers.first_failure()
            if failure is not None:
                rank, code = failure
                running = [str(r) for r, p in enumerate(workers.procs) if p.poll() is None]
                stopping = f"; stopping rank(s) {', '.join(running)}" if running else ""
                print(f"launch_cpu: worker rank {rank} (pid {workers.procs[rank].pid}) {how_it_ended(code)}{stopping}: "
                      "the other workers' errors (e.g. gloo's 'Connection closed') follow from it", file=sys.stderr, flush=True)
                workers.stop()
                print(f"launch_cpu: failed: worker rank {rank} {how_it_ended(code)}", file=sys.stderr, flush=True)
                return exit_status(code)
            if all(p.poll() == 0 for p in workers.procs):
                return 0
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python -m fairseq_smlp.distributed.launch_cpu --nprocs N [--port P] -- fairseq-train ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m fairseq_smlp.distributed.launch_cpu")
    parser.add_argument("--nprocs", type=int, required=True, help="number of CPU workers (data-parallel ranks)")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv[:split])
    check_args(parser, args)
    return launch(argv[split + 1 :], args.nprocs, args.port)


if __name__ == "__main__":
    sys.exit(main())
