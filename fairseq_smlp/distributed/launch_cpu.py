"""Start N CPU workers of a fairseq command with the gloo backend.

    python -m fairseq_smlp.distributed.launch_cpu --nprocs 2 -- fairseq-train DATA --user-dir fairseq_smlp ...

fairseq's own launcher refuses CPU-only machines and torchrun divides by the CUDA device
count, so this starts one process per rank itself and hands each fairseq's own options:
--cpu --distributed-world-size N --distributed-rank R --distributed-backend gloo
--distributed-init-method tcp://127.0.0.1:PORT --distributed-no-spawn --device-id 0
--ddp-backend legacy_ddp (unless the command sets --ddp-backend). If one worker fails,
the others are stopped (instead of waiting forever in a collective) and its exit code returned.
On GPUs use torchrun / SLURM with NCCL as usual (see README).
"""
import argparse
import os
import socket
import subprocess
import sys
import time

from ..validation import check_args


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


def launch(command, nprocs: int, port: int = 0) -> int:
    port = port or free_port()
    procs = [subprocess.Popen(worker_command(command, nprocs, r, port), env=worker_env(nprocs)) for r in range(nprocs)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise


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
