"""Expert parallelism with 2 CPU workers (gloo on 127.0.0.1): equivalence with one process,
unequal token counts and skewed routing (variable split sizes), bad world sizes and flags, and
train -> reshard -> fairseq-eval-lm / zero-shot evaluation."""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO
from fairseq_smlp.checkpoints.safe_load import load_checkpoint_file

pytestmark = pytest.mark.slow

H, F, E, V = 8, 16, 4, 50
KINDS = ["tmoe", "switch", "gshard", "hash"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs=2, timeout=120):
    """Run fn(rank, port, *args) in nprocs processes; fail (and kill them) after timeout."""
    ctx = mp.start_processes(_run, args=(free_port(), fn, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers still running after {timeout} s: hang")


def _run(rank, port, fn, *args):
    """A worker: fn, then a clean gloo shutdown (an abrupt exit can abort the peer)."""
    import torch.distributed as dist

    fn(rank, port, *args)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init(rank, port, world=2):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


# ------------------------------------------------------------------ modules
def build(kind):
    """The layer with all E experts, distributed over this process's workers (one without a
    process group), as fairseq's build_model distributes a model."""
    import fairseq_smlp  # noqa: F401
    from fairseq_smlp.distributed.expert_parallel import data_parallel_layout, parallelize_experts
    from fairseq_smlp.moe.feed_forward_moe import FeedForwardMoE, MoEArgs
    from fairseq_smlp.moe.router import random_hash_table

    torch.manual_seed(0)
    common = dict(num_experts=E, embed_dim=H, ffn_dim=F)
    capacity = dict(train_capacity_factor=2.0, eval_capacity_factor=2.0)
    args = dict(
        tmoe=MoEArgs(router="base", **common),
        switch=MoEArgs(router="top1", **common, expert_norm=False, train_capacity_factor=1.25, eval_capacity_factor=2.0),
        # no sampling: deterministic
        gshard=MoEArgs(router="top2", **common, expert_norm=False, **capacity, second_expert_policy="all"),
        hash=MoEArgs(router="hash", **common, expert_norm=False, hash_table=random_hash_table(V, E)),
    )[kind]
    moe = FeedForwardMoE(args)
    with torch.no_grad():  # fc2 starts at zero; give it size so the experts matter
        moe.experts.fc2_weight.copy_(torch.randn(E, F, H) * 0.3)
    return parallelize_experts(moe, *data_parallel_layout())


def _local(experts):
    import torch.distributed as dist

    rank = dist.get_rank() if experts.world_size > 1 else 0
    return slice(rank * experts.num_local_experts, (rank + 1) * experts.num_local_experts)


def loss_fn(moe, x, y, ids):
    """Summed loss over the tokens (fairseq criteria sum; the trainer divides by sample_size)."""
    if hasattr(moe.router, "set_token_ids"):
        moe.router.set_token_ids(ids.t().reshape(-1))  # the layer flattens (B, T) -> B*T rows
    out, stats = moe(x)
    loss = ((out - y) ** 2).sum()
    if stats.aux_loss is not None:
        loss = loss + 10.0 * stats.aux_loss
    return loss, out


def make_data(seed=1, sizes=(6, 6)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 2, H, generator=g), torch.randn(n, 2, H, generator=g), torch.randint(V, (2, n), generator=g)) for n in sizes]


def reference(kind, steps=2):
    """One process, all experts, the two ranks' batches accumulated (DP == update-freq 2)."""
    moe = build(kind)
    init_state = {k: v.clone() for k, v in moe.state_dict().items()}
    opt = torch.optim.SGD(moe.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        batches = make_data(seed=step)
        opt.zero_grad()
        total = 0.0
        for x, y, ids in batches:
            loss, _ = loss_fn(moe, x, y, ids)
            loss.backward()
            total += loss.item()
        sample_size = sum(x.shape[0] * x.shape[1] for x, _, _ in batches)
        for p in moe.parameters():
            p.grad.mul_(1.0 / sample_size)
        opt.step()
        losses.append(total)
    moe.eval()
    evals = [loss_fn(moe, x, y, ids)[1] for x, y, ids in make_data(seed=99, sizes=(9, 4))]
    return dict(init=init_state, losses=losses, state=moe.state_dict(), evals=evals)


def is_expert(name):
    return name.startswith("experts.")


def _equivalence_worker(rank, port, kind, ref_path):
    import torch.distributed as dist
    from fairseq.distributed.legacy_distributed_data_parallel import LegacyDistributedDataParallel

    from fairseq_smlp.distributed import expert_parallel

    init(rank, port)
    ref = torch.load(ref_path)
    moe = build(kind)
    local = _local(moe.experts)
    assert moe.experts.num_local_experts == E // 2
    for name, value in moe.state_dict().items():  # sharded init == the slice of the unsharded init
        want = ref["init"][name][local] if is_expert(name) else ref["init"][name]
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=f"init of {name}")

    ddp = LegacyDistributedDataParallel(moe, process_group=expert_parallel.group(), buffer_size=2**20)
    opt = torch.optim.SGD(moe.parameters(), lr=0.05)
    for step in range(2):
        batches = make_data(seed=step)
        x, y, ids = batches[rank]
        opt.zero_grad()
        loss, _ = loss_fn(moe, x, y, ids)
        loss.backward()
        ddp.all_reduce_grads()
        sample_size = sum(b[0].shape[0] * b[0].shape[1] for b in batches)
        for p in moe.parameters():  # what fairseq's trainer does: * world_size / sample_size
            p.grad.mul_(2 / sample_size)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert math.isclose(total.item(), ref["losses"][step], rel_tol=1e-5, abs_tol=1e-5), (step, total.item(), ref["losses"][step])

    for name, value in moe.state_dict().items():
        if is_expert(name):
            parts = [torch.empty_like(value) for _ in range(2)]
            dist.all_gather(parts, value.contiguous())
            value = torch.cat(parts)
        torch.testing.assert_close(value, ref["state"][name], rtol=1e-5, atol=1e-5, msg=f"updated {name}")

    moe.eval()  # greedy / eval capacity: the ranks route unequal loads (9 vs 4 tokens a column)
    x, y, ids = make_data(seed=99, sizes=(9, 4))[rank]
    _, out = loss_fn(moe, x, y, ids)
    torch.testing.assert_close(out, ref["evals"][rank], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_two_workers_equal_one_process(kind, tmp_path):
    ref_path = tmp_path / "ref.pt"
    torch.save(reference(kind), ref_path)
    spawn(_equivalence_worker, kind, str(ref_path))


def _unequal_worker(rank, port):
    init(rank, port)
    moe = build("tmoe")
    x = torch.randn(16 if rank == 0 else 3, 1, H)
    out, _ = moe(x)  # training: balanced assignment over 16 and 3 tokens
    out.sum().backward()
    moe.eval()
    with torch.no_grad():
        out, _ = moe(torch.randn(16 if rank == 0 else 0, 1, H))  # rank 1 has no token at all
    assert out.shape[0] == (16 if rank == 0 else 0)


def test_unequal_token_counts_do_not_hang():
    spawn(_unequal_worker, timeout=90)


def _variable_split_worker(rank, port):
    """Unbalanced routing: exactly the routed rows travel (no padding to a common capacity)."""
    from fairseq_smlp.distributed import expert_parallel

    init(rank, port)
    moe = build("tmoe").eval()  # greedy top-1 at evaluation: loads follow the inputs
    with torch.no_grad():  # every token prefers expert 0 (owned by rank 0)
        moe.router.centroids.zero_()
        moe.router.centroids[0] = 1.0
    sent = []
    exchange = expert_parallel._exchange
    expert_parallel._exchange = lambda rows, out=None, inp=None: sent.append((rows.size(0), out, inp)) or exchange(rows, out, inp)
    tokens = 10 if rank == 0 else 3
    with torch.no_grad():
        moe(torch.ones(tokens, 1, H))
    expert_parallel._exchange = exchange
    (rows, receive, send), _ = sent  # there, and back
    assert rows == tokens and send == [tokens, 0]  # all to rank 0, nothing padded
    assert receive == ([10, 3] if rank == 0 else [0, 0])


def test_unbalanced_routing_sends_variable_splits():
    spawn(_variable_split_worker, timeout=90)


# greedy top-1 routes token i to SKEWED_EXPERTS[rank][i]: rank 0 sends everything to expert 3
# (rank 1's), rank 1 spreads 2/0/1/2. Rank 0 receives [0, 2] rows and its expert 1 gets none;
# rank 1 receives [10, 3], in the order e3 x 10, e2, e3, e3 (by source rank), regrouped by expert
SKEWED_EXPERTS = [[3] * 10, [0, 0, 2, 3, 3]]


def skewed_moe_and_data():
    """tMoE with centroid e = unit vector e, and each rank's tokens pushed towards their expert.
    Returns moe (eval: greedy), [(x (N, 1, H), w (N, 1, H)) per rank]."""
    moe = build("tmoe").eval()
    with torch.no_grad():
        moe.router.centroids.zero_()
        moe.router.centroids[:, :E] = torch.eye(E)
    g = torch.Generator().manual_seed(5)
    data = []
    for experts in SKEWED_EXPERTS:
        x = torch.randn(len(experts), 1, H, generator=g)
        x[torch.arange(len(experts)), 0, experts] += 10.0
        data.append((x, torch.randn(len(experts), 1, H, generator=g)))
    return moe, data


def skewed_step(moe, x, w):
    """Forward and backward of sum(w * moe(x)); returns output and input gradient."""
    x = x.clone().requires_grad_()
    out, _ = moe(x)
    (out * w).sum().backward()
    return out.detach(), x.grad


def _skewed_worker(rank, port, ref_path):
    import torch.distributed as dist

    from fairseq_smlp.distributed import expert_parallel

    init(rank, port)
    ref = torch.load(ref_path)
    moe, data = skewed_moe_and_data()
    assert moe.experts.can_run_grouped(data[rank][0])  # first pass: grouped_mm on the received rows
    for path in ("grouped", "padded slots"):
        moe.zero_grad(set_to_none=True)
        splits = []
        exchange = expert_parallel._exchange
        expert_parallel._exchange = lambda rows, out=None, inp=None: splits.append((out, inp)) or exchange(rows, out, inp)
        out, x_grad = skewed_step(moe, *data[rank])
        expert_parallel._exchange = exchange
        assert splits[0] == ([[0, 2], [10, 3]][rank], [[0, 10], [2, 3]][rank])  # (receive, send): the routed rows only
        torch.testing.assert_close(out, ref["out"][rank], rtol=1e-5, atol=1e-5, msg=path)
        torch.testing.assert_close(x_grad, ref["x_grad"][rank], rtol=1e-5, atol=1e-5, msg=path)
        for name, p in moe.named_parameters():
            grad = p.grad.clone()
            if is_expert(name):  # holds both ranks' tokens, divided by the world size (see scale_expert_grads)
                want = ref["grads"][name][_local(moe.experts)] / 2
            else:  # this rank's tokens only: summed over the ranks, as the data-parallel all-reduce does
                dist.all_reduce(grad)
                want = ref["grads"][name]
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5, msg=f"{path}: {name}")
        moe.experts.can_run_grouped = lambda x: False  # second pass: the (E_local, C, H) slot path


def test_skewed_routing_equals_one_process(tmp_path):
    """Variable split sizes, forward and backward, against one process holding every expert."""
    moe, data = skewed_moe_and_data()
    outs, x_grads = zip(*(skewed_step(moe, x, w) for x, w in data))
    loads = [torch.bincount(moe.router(x.reshape(-1, H))[0].flatten(), minlength=E).tolist() for x, _ in data]
    assert loads == [[0, 0, 0, 10], [2, 0, 1, 2]]  # the routing the workers are checked against
    ref = dict(out=outs, x_grad=x_grads, grads={n: p.grad for n, p in moe.named_parameters()})
    torch.save(ref, tmp_path / "ref.pt")
    spawn(_skewed_worker, str(tmp_path / "ref.pt"), timeout=90)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_without_tokens_in_one_process(kind):
    moe = build(kind).eval()
    if hasattr(moe.router, "set_token_ids"):
        moe.router.set_token_ids(torch.zeros(0, dtype=torch.long))
    out, _ = moe(torch.zeros(0, 1, H))
    assert out.shape == (0, 1, H)


def _bad_world_worker(rank, port):
    from fairseq_smlp.distributed.expert_parallel import data_parallel_layout, parallelize_experts
    from fairseq_smlp.moe.experts import ExpertFFN

    init(rank, port)
    with pytest.raises(ValueError, match=r"--tmoe-experts / --moe-experts.*multiple of.*--distributed-world-size"):
        parallelize_experts(ExpertFFN(3, H, F), *data_parallel_layout())


def test_world_size_must_divide_experts():
    spawn(_bad_world_worker)


# ------------------------------------------------------------ through fairseq-train
SMALL = [
    "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling", "--arch", "smlp_lm_tiny",
    "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--tmoe-ffn-embed-dim", "32",
    "--smoe-experts", "4", "--tmoe-experts", "2", "--tokens-per-sample", "32",
    "--criterion", "moe_cross_entropy", "--dropout", "0.0", "--optimizer", "adam", "--lr", "0.003",
    "--max-tokens", "512", "--log-format", "json", "--log-interval", "5", "--no-epoch-checkpoints",
    "--seed", "3", "--num-workers", "0", "--required-batch-size-multiple", "1",
]


def run(cmd, ok=True):
    env = dict(os.environ)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    log = out.stdout + out.stderr
    assert (out.returncode == 0) == ok, f"{' '.join(cmd)} rc={out.returncode}:\n{log[-4000:]}"
    return log


def launch(data_bin, save_dir, *extra):
    cmd = [sys.executable, "-m", "fairseq_smlp.distributed.launch_cpu", "--nprocs", "2", "--",
           "fairseq-train", str(data_bin), *SMALL, "--save-dir", str(save_dir), *extra]
    return cmd


def eval_ppl(data_bin, path):
    log = run(["fairseq-eval-lm", str(data_bin), "--user-dir", "fairseq_smlp", "--task", "smlp_language_modeling",
               "--path", str(path), "--tokens-per-sample", "32", "--gen-subset", "valid", "--cpu"])
    return float(re.search(r"Perplexity: ([0-9.]+)", log).group(1))


@pytest.fixture(scope="module", params=["replicated", "sharded"])
def trained(request, data_bin, tmp_path_factory):
    """2 workers train 20 updates (sMoE replicated or sharded too), then their rank files are
    merged into one; shared by the tests below, which must not write into `dir`."""
    save = tmp_path_factory.mktemp(f"two_workers_{request.param}")
    extra = ["--smoe-expert-parallel"] if request.param == "sharded" else []
    log = run(launch(data_bin, save, "--max-update", "20", *extra))
    merged = save / "merged.pt"
    out = run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", str(save / "checkpoint_last.pt"), "--to-world-size", "1", "--out", str(merged)])
    return SimpleNamespace(dir=save, extra=extra, log=log, merged=merged, reshard_log=out)


def test_train_two_workers_reshard_eval(data_bin, tmp_path, trained):
    sharded_smoe, log, merged = trained.extra, trained.log, trained.merged
    valid = [json.loads(l.split("| ", 3)[-1]) for l in log.splitlines() if "| valid |" in l]
    tmp_path = shutil.copytree(trained.dir, tmp_path / "run")  # the resume below writes here
    for r in range(2):  # every rank keeps its own experts
        assert (tmp_path / f"checkpoint_last-rank-{r}.pt").exists()
    a, b = (load_checkpoint_file(tmp_path / f"checkpoint_last-rank-{r}.pt") for r in range(2))
    key = "decoder.layers.1.feature_moe.experts.fc1_weight"
    assert a["model"][key].shape[0] == 1 and not torch.equal(a["model"][key], b["model"][key])
    assert torch.equal(a["model"]["decoder.embed_tokens.weight"], b["model"]["decoder.embed_tokens.weight"])
    spatial = "decoder.layers.1.token_mixing.gate.mixing.weight"
    assert a["model"][spatial].shape[0] == (2 if sharded_smoe else 4)

    # a rank-file refuses to load in one process, with the fix in the message
    bad = subprocess.run(["fairseq-eval-lm", str(data_bin), "--user-dir", "fairseq_smlp", "--path", str(tmp_path / "checkpoint_last-rank-0.pt"),
                          "--tokens-per-sample", "32", "--gen-subset", "valid", "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "fairseq_smlp.checkpoints reshard" in bad.stdout + bad.stderr

    assert "2 rank file(s) -> 1" in trained.reshard_log
    assert math.isclose(eval_ppl(data_bin, merged), float(valid[-1]["valid_ppl"]), rel_tol=1e-4)
    one = load_checkpoint_file(merged)
    assert one["model"][key].shape[0] == 2 and "last_optimizer_state" in one

    # 1 -> 2 gives back the original rank files (model and optimizer state)
    run([sys.executable, "-m", "fairseq_smlp.checkpoints", "reshard", str(merged), "--to-world-size", "2", "--out", str(tmp_path / "again.pt")])
    again = load_checkpoint_file(tmp_path / "again-rank-1.pt")
    for k, v in b["model"].items():
        assert torch.equal(v, again["model"][k]), k
    for idx, entry in b["last_optimizer_state"]["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(again["last_optimizer_state"]["state"][idx][k])), (idx, k)

    # resume on 2 workers: each rank loads its own file
    log = run(launch(data_bin, tmp_path, "--max-update", "25", *sharded_smoe))
    assert "checkpoint_last-rank-0.pt (epoch 1 @ 20 updates)" in log and "num_updates: 25 >= max_update: 25" in log
    resumed = load_checkpoint_file(tmp_path / "checkpoint_last-rank-1.pt")
    assert resumed["optimizer_history"][-1]["num_updates"] == 25


COPA = [  # (premise, choice1, choice2, question, label); PTB words, lengths differ on purpose
    ("the company reported a loss .", "its shares fell .", "it hired more workers .", "effect", 0),
    ("the market rose sharply .", "investors bought stocks .", "the bank closed .", "cause", 0),
    ("the price of oil went up .", "drivers paid more .", "the president spoke about the new trade bill .", "effect", 0),
    ("he sold his house .", "he needed money .", "it rained .", "cause", 0),
    ("sales of new cars dropped last year in the u.s. .", "the plant cut jobs .", "the stock market was closed .", "effect", 0),
]


def write_copa(folder):
    rows = [dict(premise=p, choice1=a, choice2=b, question=q, idx=i, label=l) for i, (p, a, b, q, l) in enumerate(COPA)]
    (folder / "copa.validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def copa_examples(folder):
    """Read only: the workers read the file the test wrote (a worker rewriting it raced the other's read)."""
    from fairseq_smlp.eval.zeroshot_tasks import TASKS

    return TASKS["copa"].load(folder / "copa.validation.jsonl")


def candidate_logprobs(path, examples):
    """log p(continuation | context) of every candidate, as the zero-shot evaluator scores them.
    Returns (scores (C,) float64, continuation lengths (C,))."""
    import fairseq_smlp  # noqa: F401
    from fairseq_smlp.eval import scoring, zeroshot

    model, d, _ = zeroshot.load_model(str(path))
    model.eval()
    build = scoring.CandidateBuilder(scoring.TextEncoder(d), d.eos(), zeroshot.max_positions_of(model))
    cands = [c for ex in examples for c in build(ex)]
    return scoring.continuation_logprobs(model, cands, d.pad()), [c.n_cont for c in cands]


def _zeroshot_worker(rank, port, save_dir, zs_dir, out):
    """Rank r scores its share of the candidates with its own experts (rank file, not merged)."""
    init(rank, port)
    examples = copa_examples(Path(zs_dir))
    mine = examples[:3] if rank == 0 else examples[3:]  # unequal batches: 6 and 4 candidates
    scores, _ = candidate_logprobs(Path(save_dir) / f"checkpoint_last-rank-{rank}.pt", mine)
    torch.save(scores, f"{out}.{rank}")


def test_zeroshot_on_resharded_checkpoint_equals_two_workers(trained, tmp_path):
    """Zero-shot scores of the merged checkpoint (one process) == those of the 2-worker model
    (each rank its own experts, exchanged all-to-all); the CLI's accuracy follows from them."""
    from fairseq_smlp.eval import scoring
    from fairseq_smlp.eval.zeroshot_tasks import TASKS

    write_copa(tmp_path)
    examples = copa_examples(tmp_path)
    spawn(_zeroshot_worker, str(trained.dir), str(tmp_path), str(tmp_path / "scores"), timeout=240)
    two_workers = torch.cat([torch.load(f"{tmp_path / 'scores'}.{r}") for r in range(2)])
    merged, n_cont = candidate_logprobs(trained.merged, examples)
    assert merged.shape == (2 * len(COPA),) and torch.isfinite(merged).all()
    torch.testing.assert_close(merged, two_workers, rtol=0, atol=1e-4)

    run([sys.executable, "-m", "fairseq_smlp.eval.zeroshot", "--path", str(trained.merged), "--cpu", "--tasks", "copa",
         "--data-dir", str(tmp_path), "--no-progress", "--normalize", "none", "--output", str(tmp_path / "zs.json")])
    copa = json.loads((tmp_path / "zs.json").read_text())["tasks"]["copa"]
    picks = [scoring.choose(two_workers[i : i + 2].tolist(), n_cont[i : i + 2], TASKS["copa"].length_normalized) for i in range(0, len(two_workers), 2)]
    assert copa["examples"] == len(COPA)
    assert copa["accuracy"] == sum(p == ex.label for p, ex in zip(picks, examples)) / len(COPA)


def test_no_c10d_backend_trains_with_sharded_experts(data_bin, tmp_path):
    log = run(launch(data_bin, tmp_path, "--max-update", "3", "--ddp-backend", "no_c10d"))
    assert "num_updates: 3 >= max_update: 3" in log
    assert (tmp_path / "checkpoint_last-rank-1.pt").exists()


def test_half_precision_with_sharded_experts_needs_unflattened_grads():
    """Flattened fp16 master weights would lose the `expert` mark (checked once the trainer
    exists, i.e. on a GPU run: on a CPU --fp16 is refused earlier, test_bad_input.py)."""
    from types import SimpleNamespace

    from fairseq_smlp.checkpoints.rank_files import check_config

    def cfg(**common):
        flags = dict(fp16=True, bf16=False, memory_efficient_fp16=False, memory_efficient_bf16=False, fp16_no_flatten_grads=False)
        flags.update(common)
        return SimpleNamespace(common=SimpleNamespace(**flags),
                               distributed_training=SimpleNamespace(ddp_backend="legacy_ddp", distributed_world_size=2))

    with pytest.raises(ValueError, match="--fp16-no-flatten-grads"):
        check_config(cfg())
    check_config(cfg(fp16_no_flatten_grads=True))  # accepted
    check_config(cfg(fp16=False))


def test_fp16_on_cpu_with_sharded_experts_is_refused(data_bin, tmp_path):
    """Both workers stop at start with the flag named (--fp16-no-flatten-grads does not help on a CPU)."""
    log = run(launch(data_bin, tmp_path, "--max-update", "1", "--fp16", "--fp16-no-flatten-grads"), ok=False)
    assert "--fp16 needs a CUDA GPU" in log and "drop --fp16" in log
    assert not list(tmp_path.glob("*.pt"))


def test_c10d_with_sharded_experts_is_refused(data_bin, tmp_path):
    log = run(launch(data_bin, tmp_path, "--max-update", "1", "--ddp-backend", "c10d"), ok=False)
    assert "--ddp-backend c10d does not support sharded experts" in log


# ------------------------------------------------------------ sharded sMoE
SMOE_SHAPES = [(3, 10), (2, 7)]  # (sequences, length) of rank 0 and rank 1: unequal on purpose


def build_sgu(sharded):
    import fairseq_smlp  # noqa: F401
    from fairseq_smlp.distributed.expert_parallel import data_parallel_layout, parallelize_experts
    from fairseq_smlp.modules.spatial_gating import SpatialGateArgs, SpatialGatingUnit

    torch.manual_seed(0)
    sgu = SpatialGatingUnit(SpatialGateArgs(channels=8, max_positions=12, num_experts=4, init_eps=1.0, expert_parallel=sharded))
    return parallelize_experts(sgu, *data_parallel_layout())


def smoe_data(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(b, n, 8, generator=g), torch.randn(b, n, 8, generator=g)) for b, n in SMOE_SHAPES]


def smoe_reference():
    sgu = build_sgu(False)
    opt = torch.optim.SGD(sgu.parameters(), lr=0.05)
    losses = []
    for step in range(2):
        opt.zero_grad()
        batches = smoe_data(step)
        total = 0.0
        for u, y in batches:
            loss = ((sgu(u)[0] - y) ** 2).sum()
            loss.backward()
            total += loss.item()
        for p in sgu.parameters():
            p.grad.mul_(1.0 / sum(u.shape[0] * u.shape[1] for u, _ in batches))
        opt.step()
        losses.append(total)
    return dict(losses=losses, state=sgu.state_dict())


def _smoe_worker(rank, port, ref_path):
    import torch.distributed as dist
    from fairseq.distributed.legacy_distributed_data_parallel import LegacyDistributedDataParallel

    from fairseq_smlp.distributed import expert_parallel

    init(rank, port)
    ref = torch.load(ref_path)
    sgu = build_sgu(True)
    assert sgu.mixing.weight.shape[0] == 2
    ddp = LegacyDistributedDataParallel(sgu, process_group=expert_parallel.group(), buffer_size=2**20)
    opt = torch.optim.SGD(sgu.parameters(), lr=0.05)
    for step in range(2):
        batches = smoe_data(step)
        u, y = batches[rank]
        opt.zero_grad()
        loss = ((sgu(u)[0] - y) ** 2).sum()
        loss.backward()
        ddp.all_reduce_grads()
        for p in sgu.parameters():
            p.grad.mul_(2 / sum(b[0].shape[0] * b[0].shape[1] for b in batches))
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert math.isclose(total.item(), ref["losses"][step], rel_tol=1e-5), (total.item(), ref["losses"][step])
    for name, value in sgu.state_dict().items():
        if name.startswith("mixing."):
            parts = [torch.empty_like(value) for _ in range(2)]
            dist.all_gather(parts, value.contiguous())
            value = torch.cat(parts)
        torch.testing.assert_close(value, ref["state"][name], rtol=1e-5, atol=1e-5, msg=name)


def test_sharded_smoe_equals_replicated(tmp_path):
    ref_path = tmp_path / "ref.pt"
    torch.save(smoe_reference(), ref_path)
    spawn(_smoe_worker, str(ref_path))


# ------------------------------------------------------------------ global-batch balance
def _global_batch_data(rank: int, micro_batch: int):
    generator = torch.Generator().manual_seed(10 * rank + micro_batch)
    return torch.randn(12 + 4 * rank, H, generator=generator) + rank  # workers route differently


def _global_batch_worker(rank, port):
    """--moe-balance-scope global-batch: at micro-batch m every worker's f_e counts the first
    choices of micro-batches 1..m on both workers, as one process that saw all of them would."""
    from fairseq_smlp.moe.router import Top1Router, switch_aux_loss

    init(rank, port)
    torch.manual_seed(0)
    router = Top1Router(H, E, 0, 0, balance_scope="global-batch").train()
    for micro_batch in range(2):
        x = _global_batch_data(rank, micro_batch)
        aux = router(x)[2].aux_loss
        with torch.no_grad():  # every worker's first choices so far
            seen = [(_global_batch_data(r, m) @ router.gate.weight.t()).argmax(1) for r in range(2) for m in range(micro_batch + 1)]
        probs = torch.softmax(x @ router.gate.weight.t(), dim=1)
        counts = torch.bincount(torch.cat(seen), minlength=E)
        expected = switch_aux_loss(probs, probs.argmax(1), counts)
        assert math.isclose(aux.item(), expected.item(), rel_tol=1e-6), (rank, micro_batch, aux.item(), expected.item())


def test_global_batch_balance_counts_every_worker():
    spawn(_global_batch_worker, timeout=90)


# ------------------------------------------------------------------ auxiliary-loss-free bias
def _biased_bias_worker(rank, port):
    """top1_biased: the bias step after an update counts the loads of every micro-batch of that
    update on both workers, so both workers hold the same bias, the one a single process that
    saw all the tokens would compute."""
    from fairseq_smlp.moe.router import Top1BiasedRouter

    init(rank, port)
    torch.manual_seed(0)
    rate = 0.25
    router = Top1BiasedRouter(H, E, bias_update_rate=rate).train()
    router.set_num_updates(0)  # as fairseq's task does before every training forward
    for micro_batch in range(2):
        router(_global_batch_data(rank, micro_batch))
    router.set_num_updates(1)  # fairseq: the next update's first forward steps the bias
    router(_global_batch_data(rank, 2))
    with torch.no_grad():  # every worker's choices during update 0, before any bias
        seen = [torch.sigmoid(_global_batch_data(r, m) @ router.gate.weight.t()).argmax(1) for r in range(2) for m in range(2)]
    load = torch.bincount(torch.cat(seen), minlength=E).float()
    expected = rate * torch.sign(load.mean() - load)
    assert load.min() != load.max(), "the data must load experts unevenly for the test to bite"
    assert torch.equal(router.expert_bias, expected), (rank, router.expert_bias, expected)


def test_biased_router_steps_its_bias_from_every_worker():
    spawn(_biased_bias_worker, timeout=90)
