"""Move expert-parallel checkpoints between world sizes.

    python -m fairseq_smlp.checkpoints reshard CKPT... --to-world-size N --out OUT.pt

CKPT: the rank files of one checkpoint (checkpoint_last-rank-0.pt checkpoint_last-rank-1.pt ...),
or their common name (checkpoint_last.pt: the -rank-R files next to it are found), or one
plain single-process checkpoint. Writes OUT.pt for N = 1 (what fairseq-eval-lm, the zero-shot
evaluator and single-process training load) or OUT-rank-R.pt for N > 1 (the layout of
checkpoints/rank_files.py: pass --save-dir/--restore-file OUT.pt to resume on N workers).

Expert tensors (stacked (E_local, ...)) are concatenated over the M input ranks and split
into N; shared tensors are taken from rank 0 (and checked equal on all ranks). Optimizer
state follows the same rule where it is kept per parameter (fp32 Adam & co.); flattened
state (--fp16 master weights) cannot be split and is dropped, with a message.
"""
import argparse
import glob
import os
import re
import sys

import torch

from ..validation import check_args
from .file_safety import CorruptCheckpointError, load_or_explain

EXPERT_SUFFIXES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "norm_weight", "norm_bias")


def rank_files(paths):
    """Expand `checkpoint_last.pt` to its -rank-R files when it does not exist itself."""
    if len(paths) == 1 and not os.path.exists(paths[0]):
        stem = paths[0][: -len(".pt")] if paths[0].endswith(".pt") else paths[0]
        found = glob.glob(glob.escape(stem) + "-rank-*.pt")
        if not found:
            sys.exit(f"reshard: {paths[0]} does not exist, nor any {stem}-rank-R.pt")
        return sorted(found, key=lambda p: int(re.search(r"-rank-(\d+)\.pt$", p).group(1)))
    return list(paths)


def load(path):
    return load_or_explain(torch.load, path, map_location="cpu", weights_only=False)


def expert_names(state):
    """Names of the stacked expert tensors: from the metadata, else from ExpertFFN's names."""
    meta = state.get("expert_parallel")
    if meta:
        return set(meta["expert_params"])
    return {k for k in state["model"] if k.split(".")[-1] in EXPERT_SUFFIXES and ".experts." in f".{k}"}


def split_rows(tensors, n):
    """Concatenate (E_m, ...) tensors of M ranks, split into N equal (E / N, ...) pieces."""
    full = torch.cat(tensors)
    if full.size(0) % n:
        sys.exit(f"reshard: {full.size(0)} experts cannot be split over --to-world-size {n}")
    return list(full.chunk(n))


def reshard_model(states, n, experts):
    out = [{} for _ in range(n)]
    for key, value in states[0]["model"].items():
        if key in experts:
            for r, piece in enumerate(split_rows([s["model"][key] for s in states], n)):
                out[r][key] = piece.clone()
            continue
        for s in states[1:]:
            if not torch.equal(s["model"][key], value):
                print(f"reshard: warning: shared tensor {key} differs between ranks; taking rank 0's")
                break
        for r in range(n):
            out[r][key] = value
    return out


def reshard_optimizer(states, n, experts):
    """Per-parameter optimizer state, resharded; None (dropped) where that is impossible."""
    optim = [s.get("last_optimizer_state") for s in states]
    meta = states[0].get("expert_parallel")
    if optim[0] is None:
        return None
    names = meta["param_names"] if meta else None
    if names is None:
        names = [k for k in states[0]["model"]]  # single-process checkpoint: parameter order = state order
    per_param = all(isinstance(o.get("state"), dict) and len(o["param_groups"]) == 1 and len(o["param_groups"][0]["params"]) == len(names) for o in optim)
    if not per_param:
        print("reshard: dropping the optimizer state: it is not kept per parameter (flattened fp16 master "
              "weights?); resume with --reset-optimizer")
        return None
    out = []
    for r in range(n):
        new = {"state": {}, "param_groups": optim[0]["param_groups"]}
        for idx, name in enumerate(names):
            entries = [o["state"].get(idx) for o in optim]
            if entries[0] is None:
                continue
            new["state"][idx] = {
                k: (split_rows([e[k] for e in entries], n)[r].clone() if name in experts and torch.is_tensor(v) and v.dim() > 0 else v)
                for k, v in entries[0].items()
            }
        out.append(new)
    return out


def output_paths(out, n):
    return [out] if n == 1 else [out.replace(".pt", f"-rank-{r}.pt") for r in range(n)]


def reshard(paths, n, out):
    paths = rank_files(paths)
    states = [load(p) for p in paths]
    metas = [s.get("expert_parallel") for s in states]
    if metas[0]:
        states = [s for _, s in sorted(zip([m["rank"] for m in metas], states), key=lambda t: t[0])]
        if len(states) != metas[0]["world_size"]:
            sys.exit(f"reshard: the checkpoint has {metas[0]['world_size']} rank files, {len(states)} given")
    experts = expert_names(states[0])
    if not experts:
        print("reshard: no expert tensors found; every output holds the full model")
    models = reshard_model(states, n, experts)
    optims = reshard_optimizer(states, n, experts)
    param_names = metas[0]["param_names"] if metas[0] else list(states[0]["model"])
    written = []
    for r, path in enumerate(output_paths(out, n)):
        state = dict(states[0])
        state["model"] = models[r]
        if optims is None:
            state.pop("last_optimizer_state", None)
        else:
            state["last_optimizer_state"] = optims[r]
        # kept for N = 1 too (fairseq ignores it): the file can be resharded again with its optimizer state
        state["expert_parallel"] = {"world_size": n, "rank": r, "expert_params": sorted(experts), "param_names": param_names}
        cfg = state.get("cfg")
        if cfg is not None and "distributed_training" in cfg:
            cfg["distributed_training"]["distributed_world_size"] = n
        torch.save(state, path + ".tmp")  # atomic: a crash never leaves a half-written OUT
        os.replace(path + ".tmp", path)
        written.append(path)
    print(f"reshard: {len(paths)} rank file(s) -> {n}: " + " ".join(written))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_smlp.checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("reshard", help="turn a checkpoint of M expert-parallel workers into one for N")
    p.add_argument("checkpoints", nargs="+", help="the rank files, or their common name (checkpoint_last.pt)")
    p.add_argument("--to-world-size", type=int, required=True, help="N workers (1: one file for eval / one process)")
    p.add_argument("--out", required=True, help="output file; N > 1 writes OUT-rank-R.pt")
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        reshard(args.checkpoints, args.to_world_size, args.out)
    except CorruptCheckpointError as e:
        sys.exit(f"reshard: {e}")


if __name__ == "__main__":
    main()
