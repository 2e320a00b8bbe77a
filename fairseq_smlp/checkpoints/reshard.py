"""Move expert-parallel checkpoints between world sizes.

    python -m fairseq_smlp.checkpoints reshard CKPT... --to-world-size N --out OUT.pt

CKPT: the rank files of one checkpoint (checkpoint_last-rank-0.pt checkpoint_last-rank-1.pt ...),
or their common name (checkpoint_last.pt: the -rank-R files next to it are found), or one
plain single-process checkpoint. Writes OUT.pt for N = 1 (what fairseq-eval-lm, the zero-shot
evaluator and single-process training load) or OUT-rank-R.pt for N > 1 (the layout of
checkpoints/rank_files.py: pass --save-dir/--restore-file OUT.pt to resume on N workers).

Expert tensors (stacked (E_local, ...)) are concatenated over the M input ranks and split
into N; shared tensors are taken from rank 0 (and checked equal on all ranks). Rank files
saved at different updates are refused. Optimizer state follows the same rule where it is
kept per parameter (fp32 Adam & co.): the parameter order comes from the rank files'
metadata, or, for a single-process checkpoint, from its model rebuilt on the meta device
(tied parameters counted once, as fairseq's optimizer counts them). State that cannot be
split (--fp16 flattened master weights) is dropped, with the exact reason.
"""

import argparse
import glob
import os
import re
import sys

import torch

from ..atomic_write import atomic_output
from ..validation import check_args
from ..errors import UserError, exit_with
from .safe_load import load_checkpoint_file

EXPERT_SUFFIXES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "norm_weight", "norm_bias")
# fairseq's BaseLayer: one expert per worker, BaseSublayer s of it = norm, ff1, ff2 (nn.Linear)
BASE_SUBLAYER = re.compile(
    r"^(?P<layer>.*\.)expert_network\.(?P<s>\d+)\.(?P<module>norm|ff1|ff2)\.(?P<kind>weight|bias)$"
)


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
    """A rank file, loaded safely (memory-mapped; a refused global or a damaged file named)."""
    return load_checkpoint_file(path)


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


def update_of(state):
    history = state.get("optimizer_history") or [{}]
    return history[-1].get("num_updates")


def check_one_save(paths, states):
    """Rank files of one save: ranks 0..W-1 once each, all at the same update."""
    metas = [s.get("expert_parallel") for s in states]
    if metas[0]:
        ranks = sorted(m["rank"] if m else -1 for m in metas)
        if ranks != list(range(metas[0]["world_size"])):
            sys.exit(
                f"reshard: the checkpoint has {metas[0]['world_size']} rank files "
                f"(ranks 0..{metas[0]['world_size'] - 1}); "
                f"given: " + ", ".join(f"{p} (rank {m['rank'] if m else 'none'})" for p, m in zip(paths, metas))
            )
    updates = [update_of(s) for s in states]
    if len(set(updates)) > 1:
        sys.exit(
            "reshard: the rank files were saved at different updates (a run killed between the ranks' saves?): "
            + ", ".join(f"{p}: update {u}" for p, u in zip(paths, updates))
            + ". Pass the rank files of one save, e.g. checkpoint_<epoch>_<update>-rank-R.pt of an update every "
            "rank wrote"
        )


def reshard_model(states, n, experts):
    out = [{} for _ in range(n)]
    differing = []
    for key, value in states[0]["model"].items():
        if key in experts:
            for r, piece in enumerate(split_rows([s["model"][key] for s in states], n)):
                out[r][key] = piece.clone()
            continue
        if any(not torch.equal(s["model"][key], value) for s in states[1:]):
            differing.append(key)
        for r in range(n):
            out[r][key] = value
    if differing:
        print(
            f"reshard: warning: {len(differing)} shared tensor(s) differ between ranks (first: {differing[0]}); taking "
            "rank 0's. Shared parameters stay equal under --ddp-backend legacy_ddp; this run did not keep them so"
        )
    return out


def parameter_names(state):
    """Names of the trained parameters in the order of the optimizer state: the rank files'
    metadata, else the checkpoint's model rebuilt from its cfg on the meta device (no memory),
    ordered as fairseq's Trainer hands them to the optimizer (model.parameters(), tied once)."""
    meta = state.get("expert_parallel")
    if meta:
        return meta["param_names"]
    from omegaconf import OmegaConf

    from ..models.factory import build_from_config

    cfg = OmegaConf.create(state["cfg"])
    vocab = state["model"]["decoder.embed_tokens.weight"].size(0)
    model = build_from_config(cfg, vocab)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in state["model"]]
    if missing:
        raise ValueError(f"the rebuilt model has parameters the checkpoint lacks ({missing[0]}, ...)")
    return names


def why_not_per_parameter(optim, names):
    """None if every optimizer state is kept per parameter in `names` order, else the reason."""
    for o in optim:
        if not isinstance(o.get("state"), dict) or "param_groups" not in o:
            return "it is not a torch optimizer state (no per-parameter 'state')"
        groups = o["param_groups"]
        if len(groups) != 1:
            return f"it has {len(groups)} parameter groups (one expected)"
        count = len(groups[0]["params"])
        if count == 1 and len(names) > 1:
            return (
                "it holds one flattened fp32 vector for all parameters (--fp16/--bf16 master weights without "
                "--fp16-no-flatten-grads), which cannot be split by expert"
            )
        if count != len(names):
            return f"it holds {count} parameters, the model {len(names)}"
    return None


def reshard_optimizer(states, n, experts):
    """(per-parameter optimizer state resharded, parameter names); None where it cannot be
    kept, after saying exactly why."""
    optim = [s.get("last_optimizer_state") for s in states]
    if optim[0] is None:
        return None, None
    try:
        names = parameter_names(states[0])
    except Exception as e:  # a cfg this code cannot build (another plugin version, missing arch, ...)
        print(
            f"reshard: dropping the optimizer state: the parameter order could not be recovered (rebuilding the "
            f"model from the checkpoint's cfg failed: {type(e).__name__}: {e}); resume with --reset-optimizer"
        )
        return None, None
    reason = why_not_per_parameter(optim, names)
    if reason:
        print(f"reshard: dropping the optimizer state: {reason}; resume with --reset-optimizer")
        return None, names
    out = []
    for r in range(n):
        new = dict(optim[0], state={})  # param_groups and the rest (e.g. fp16 loss_scale) as saved
        for idx, name in enumerate(names):
            entries = [o["state"].get(idx) for o in optim]
            if entries[0] is None:
                continue
            state = {}
            for k, v in entries[0].items():
                if name in experts and torch.is_tensor(v) and v.dim() > 0:  # an expert's rows: this rank's
                    v = split_rows([e[k] for e in entries], n)[r].clone()
                state[k] = v
            new["state"][idx] = state
        out.append(new)
    return out, names


def reshard_fp16_masters(states, optims, names, n, experts):
    """The fp32 master weights an --fp16 run keeps with its optimizer state (fairseq_patches.py,
    one tensor per parameter in `names` order): expert ones split like the experts, shared ones
    kept. Flattened masters (one tensor per device) cannot be split: dropped (fairseq then
    rebuilds them from the fp16 weights, as it always did)."""
    if optims is None:
        return None
    masters = [s["last_optimizer_state"].get("fp32_master") for s in states]
    for o in optims:
        o.pop("fp32_master", None)
    if masters[0] is None or names is None or any(m is None or len(m) != len(names) for m in masters):
        return optims
    for idx, name in enumerate(names):
        pieces = split_rows([m[idx] for m in masters], n) if name in experts else [masters[0][idx]] * n
        for r, o in enumerate(optims):
            o.setdefault("fp32_master", []).append(pieces[r].clone() if name in experts else pieces[r])
    return optims


def output_paths(out, n):
    """OUT.pt for one worker, OUT-rank-R.pt for N: only the final .pt suffix is replaced (a
    `.pt` elsewhere in the path stays, and --out without it is refused in main)."""
    return [out] if n == 1 else [f"{out[: -len('.pt')]}-rank-{r}.pt" for r in range(n)]


def base_layer_keys(model_state) -> set:
    """Parameters of fairseq's BaseLayer (one expert per worker) in a model state."""
    def centroids_of_a_base_layer(k):
        layer = k[: -len("expert_centroids")]
        return k.endswith(".expert_centroids") and layer + "expert_network.0.ff1.weight" in model_state

    return {k for k in model_state if BASE_SUBLAYER.match(k) or centroids_of_a_base_layer(k)}


def base_layers_to_experts(models):
    """W rank files' fairseq BaseLayers -> one BaseExpertsLayer with E = W experts (the layout a
    single process builds for Base Layers: moe/base_experts.py, BaseRouter + S stacked
    residual ExpertFFN sublayers, fairseq's maths). models: the W ranks' model states, in rank
    order (rank r holds expert r). Returns {key: tensor} of the new layer's parameters; every
    BaseLayer key of the input is replaced.

        L.expert_centroids (W, H)                 -> L.router.centroids (W, H)
        L.expert_network.s.norm.{weight,bias} (H) -> L.experts.sublayers.s.norm_{weight,bias}[r] (1, H)
        L.expert_network.s.ff1.weight (F, H)      -> L.experts.sublayers.s.fc1_weight[r] (H, F) (x @ W, not W x)
        L.expert_network.s.ff1.bias (F)           -> L.experts.sublayers.s.fc1_bias[r] (1, F)
        L.expert_network.s.ff2.weight (H, F)      -> L.experts.sublayers.s.fc2_weight[r] (F, H)
        L.expert_network.s.ff2.bias (H)           -> L.experts.sublayers.s.fc2_bias[r] (1, H)
    """
    out = {}
    for key in sorted(base_layer_keys(models[0])):
        if key.endswith(".expert_centroids"):
            centroids = models[0][key]
            if centroids.size(0) != len(models):
                sys.exit(f"reshard: {key} has {centroids.size(0)} experts but {len(models)} rank files were given")
            out[key[: -len("expert_centroids")] + "router.centroids"] = centroids.clone()
            continue
        m = BASE_SUBLAYER.match(key)
        name = {"norm": "norm", "ff1": "fc1", "ff2": "fc2"}[m["module"]] + "_" + m["kind"]
        per_rank = [state[key] for state in models]
        if m["module"] != "norm" and m["kind"] == "weight":
            per_rank = [w.t() for w in per_rank]  # nn.Linear keeps (out, in); ExpertFFN multiplies x @ W
        else:
            per_rank = [b.unsqueeze(0) for b in per_rank]  # (D) -> (1, D), broadcast over rows
        out[f"{m['layer']}experts.sublayers.{m['s']}.{name}"] = torch.stack(per_rank).contiguous()
    return out


def reshard(paths, n, out):
    paths = rank_files(paths)
    states = [load(p) for p in paths]
    check_one_save(paths, states)
    metas = [s.get("expert_parallel") for s in states]
    if metas[0]:
        states = [s for _, s in sorted(zip([m["rank"] for m in metas], states), key=lambda t: t[0])]
    experts = expert_names(states[0])
    base = base_layer_keys(states[0]["model"])
    if base and n not in (1, len(states)):
        sys.exit(
            f"reshard: fairseq's BaseLayer holds one expert per worker: {len(states)} rank files can become one "
            f"process (--to-world-size 1: all {len(states)} experts in one layer) or {len(states)} workers, not {n}"
        )
    if not experts:
        print("reshard: no expert tensors found; every output holds the full model")
    ranked = states  # in rank order: rank r holds expert r of a BaseLayer
    if base and n == 1:
        states = [dict(s, model={k: v for k, v in s["model"].items() if k not in base}) for s in states]
        experts -= base
    models = reshard_model(states, n, experts)
    optims, param_names = reshard_optimizer(states, n, experts)
    optims = reshard_fp16_masters(states, optims, param_names, n, experts)
    param_names = param_names or (metas[0]["param_names"] if metas[0] else None)
    if base and n == 1:
        models[0].update(base_layers_to_experts([s["model"] for s in ranked]))
        optims = None  # parameters renamed and reshaped: the optimizer state does not follow
        print(
            f"reshard: fairseq's BaseLayer of {len(states)} workers -> one layer with all {len(states)} experts "
            "(optimizer state dropped: resume training from it with --reset-optimizer)"
        )
    written = []
    for r, path in enumerate(output_paths(out, n)):
        state = dict(states[0])
        state["model"] = models[r]
        if optims is None:
            state.pop("last_optimizer_state", None)
        else:
            state["last_optimizer_state"] = optims[r]
        # kept for N = 1 too (fairseq ignores it): the file can be resharded again with its optimizer state
        if param_names is not None:
            state["expert_parallel"] = {
                "world_size": n, "rank": r, "expert_params": sorted(experts), "param_names": param_names,
            }
        else:
            state.pop("expert_parallel", None)
        cfg = state.get("cfg")
        if cfg is not None and "distributed_training" in cfg:
            cfg["distributed_training"]["distributed_world_size"] = n
        if base and n == 1 and cfg is not None:
            cfg["model"]["base_experts"] = len(paths)  # one process builds all experts (BaseExpertsLayer)
        with atomic_output(path) as tmp:  # a crash never leaves a half-written OUT, nor a fixed OUT.pt.tmp
            torch.save(state, tmp)
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
    if not args.out.endswith(".pt") or os.path.basename(args.out) == ".pt":
        parser.error(f"--out {args.out}: must end in .pt (e.g. --out resharded.pt; N > 1 writes resharded-rank-R.pt)")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):  # found before the checkpoints are read, not when writing
        parser.error(f"--out {args.out}: folder {folder} does not exist")
    try:
        reshard(args.checkpoints, args.to_world_size, args.out)
    except UserError as e:  # a corrupt or refused checkpoint: one line
        exit_with(e, "reshard")


if __name__ == "__main__":
    main()
