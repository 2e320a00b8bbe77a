"""Share of the training step spent in the expert all-to-all, 2 CPU workers (gloo).

    python -m benchmarks.alltoall_overhead [--steps 10] [--batch 8] [--length 128] [--smoe-sharded]

Each worker trains smlp_lm_tiny-sized sMLP (4 blocks, H=128, 2 sparse blocks with 4 tMoE
experts sharded 2 per worker) on random tokens: forward, backward, legacy_ddp gradient
all-reduce, SGD step. The exchange is timed inside fairseq_smlp.distributed.expert_parallel
(forward calls, and backward calls through gradient hooks). Writes
benchmarks/results/alltoall_overhead.json.
"""
import argparse
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fairseq_smlp.atomic_write import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def build_model(length: int, smoe_sharded: bool = False, vocab: int = 1000):
    import fairseq_smlp  # noqa: F401
    from fairseq.data import Dictionary
    from fairseq_smlp.models.smlp_lm import SmlpConfig, SmlpLanguageModel

    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    cfg = SmlpConfig(decoder_embed_dim=128, decoder_ffn_embed_dim=512, decoder_layers=4, sparse_every=2, smoe_experts=4,
                     tmoe_experts=4, tmoe_ffn_embed_dim=256, dropout=0.0, max_target_positions=length, tokens_per_sample=length, smoe_expert_parallel=smoe_sharded)
    torch.manual_seed(0)
    return SmlpLanguageModel.build_model(cfg, SimpleNamespace(source_dictionary=d, target_dictionary=d)), vocab


def worker(rank, port, args, out_path):
    from fairseq.distributed.legacy_distributed_data_parallel import LegacyDistributedDataParallel

    from fairseq_smlp.distributed import expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model, vocab = build_model(args.length, args.smoe_sharded)
    ddp = LegacyDistributedDataParallel(model, process_group=expert_parallel.group(), buffer_size=2**24)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    step_times, comm = [], []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(4, vocab, (args.batch, args.length + 1), generator=g)
        dist.barrier()
        expert_parallel.TIMER.update(enabled=True, seconds=0.0)
        start = time.perf_counter()
        opt.zero_grad()
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        ddp.all_reduce_grads()
        opt.step()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            comm.append(expert_parallel.TIMER["seconds"])
    if rank == 0:
        result = {
            "workers": 2, "backend": "gloo", "threads_per_worker": 1, "tokens_per_worker_step": args.batch * args.length,
            "model": "smlp_lm_tiny dims (H=128, F=512, 4 blocks, 2 sparse, 4 tMoE experts, 2 per worker)",
            "step_s_mean": sum(step_times) / len(step_times), "alltoall_s_mean": sum(comm) / len(comm),
            "alltoall_share_of_step": sum(comm) / sum(step_times), "steps": args.steps,
            "smoe": "sharded (2 of 4 spatial experts per worker)" if args.smoe_sharded else "replicated",
            "note": "all-to-all time includes waiting for the slower worker (it is also the synchronisation point)",
        }
        atomic_write_text(Path(out_path), json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alltoall_overhead")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--smoe-sharded", action="store_true", help="also shard the sMoE spatial experts (--smoe-expert-parallel)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/alltoall_overhead[_smoe_sharded].json")
    args = parser.parse_args()
    name = "alltoall_overhead_smoe_sharded.json" if args.smoe_sharded else "alltoall_overhead.json"
    args.out = args.out or str(REPO / "benchmarks" / "results" / name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, args, args.out), nprocs=2)


if __name__ == "__main__":
    main()
