"""The sparsity study (benchmarks/sparsity): crossover arithmetic, router health, resumable records, and one short
real run of two models (skipped again when rerun)."""
import json
import math

import pytest
import torch

from benchmarks.sparsity import analysis, train
from benchmarks.sparsity import models as study_models
from benchmarks.sparsity import records as raw
from benchmarks.sparsity.cli import main as study


def curve(values, key="nll"):
    return [{"tokens": 1000 * (i + 1), key: v} for i, v in enumerate(values)]


def test_crossover_is_where_the_sparse_curve_stays_below_to_the_end():
    dense = curve([5.0, 4.0, 3.5, 3.2, 3.0])
    assert analysis.paired_crossover(curve([5.5, 3.9, 3.6, 3.1, 2.9]), dense) == 4000  # dips below at 2000, back above, below from 4000
    assert analysis.paired_crossover(curve([4.9, 3.9, 3.4, 3.1, 2.9]), dense) == 1000  # below all along
    assert analysis.paired_crossover(curve([4.9, 3.9, 3.4, 3.1, 3.0]), dense) is None  # tied at the end: does not pass
    assert analysis.paired_crossover(curve([4.9, 3.9], "valid_nll"), curve([5.0, 4.0, 3.0], "valid_nll"), "valid_nll") == 1000


def test_validation_blocks_are_spread_over_the_whole_set():
    assert train.valid_indices(10, 0) == list(range(10))
    assert train.valid_indices(100, 4) == [0, 25, 50, 75]
    assert train.eval_schedule(1000, 4) == [250, 500, 750, 1000]


def test_every_sparse_model_names_its_dense_counterpart():
    for name, (arch, extra, dense, family, experts) in study_models.MODELS.items():
        assert (dense is None) == (name in study_models.DENSE)
        if dense:
            assert dense == ("gmlp" if arch.startswith("smlp") else "transformer")
            assert str(experts) in extra


@pytest.mark.parametrize("name", [n for n, spec in study_models.MODELS.items() if spec[3] in study_models.ROUTED_FAMILIES and spec[4] == 4])
def test_router_study_models_build_with_their_router(name):
    """Each router of the study, in sMLP's tMoE and in Switch's place, parses and is built
    with that router (meta device: shapes only)."""
    from fairseq_smlp.models.factory import build_model
    from fairseq_smlp.moe.router import Router

    arch, extra, dense, family, experts = study_models.MODELS[name]
    model, _ = build_model(arch, extra)
    routers = {type(m).__name__ for m in model.modules() if isinstance(m, Router)}
    expected = {"top1": "Top1Router", "top1_global": "Top1Router", "top1_dropless": "Top1Router", "top1_biased": "Top1BiasedRouter",
                "top1_biased_r01": "Top1BiasedRouter", "top1_biased_z": "Top1BiasedRouter", "sinkhorn": "SinkhornRouter",
                "causal_balanced": "CausalBalancedRouter"}[family.split("_", 1)[1]]
    assert expected in routers, (name, routers)
    rates = {m.bias_update_rate for m in model.modules() if hasattr(m, "bias_update_rate")}
    assert rates == ({0.01} if family.endswith("_r01") else {0.001} if "biased" in family else set()), (name, rates)
    z_loss = {m.z_loss_weight for m in model.modules() if isinstance(m, Router) and hasattr(m, "z_loss_weight")}
    assert (z_loss == {0.1}) == family.endswith("_z"), (name, z_loss)
    capacity = {m.train_capacity_factor for m in model.modules() if hasattr(m, "train_capacity_factor")}
    assert capacity == ({0.0} if family.endswith("_dropless") else {1.25} if "top1" in family and "biased" not in family else set()), (name, capacity)


class FakeRouter(torch.nn.Module):
    """Routes token i to expert choice[i]; named as the decoder names its routers."""

    remembers_choices = True  # a token router, which RouterProbe records

    def __init__(self, choice, num_experts):
        super().__init__()
        self.choice, self.num_experts, self.name = choice, num_experts, "layers.1.fc1.router"

    def forward(self, x):
        return self.choice.unsqueeze(1), None, None


def test_router_health_entropy_unused_and_changed_share():
    router = FakeRouter(torch.tensor([0, 0, 1, 1]), 4)
    probe = train.RouterProbe(torch.nn.Sequential(router))
    with probe:
        router(torch.zeros(4, 2))
    first = probe.health()["layers.1.fc1.router"]
    assert first["unused"] == 2 and first["entropy"] == pytest.approx(math.log(2) / math.log(4))
    assert "changed" not in first and first["load_max"] == 2.0
    router.choice = torch.tensor([0, 1, 2, 3])
    with probe:
        router(torch.zeros(4, 2))
    second = probe.health()["layers.1.fc1.router"]
    assert second["entropy"] == pytest.approx(1.0) and second["unused"] == 0
    assert second["changed"] == 0.75  # tokens 1, 2 and 3 moved


def test_unfinished_models_are_forgotten_and_finished_ones_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    records = [{"kind": "meta"}, {"kind": "start", "model": "a"}, {"kind": "done", "model": "a"},
               {"kind": "start", "model": "b"}, {"kind": "train", "model": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw.drop_unfinished(path)
    kept = raw.read_records(path)
    assert [r.get("model") for r in kept] == [None, "a", "a"]
    assert raw.finished_models(kept) == {"a"}


def test_a_stopped_model_is_compared_with_its_dense_counterpart_at_the_same_tokens():
    """render --partial: a sparse run stopped after 2 of 4 evaluations is set against the dense
    run's second evaluation, not its last (the dense model trained twice as long by then)."""
    def start(model, dense):
        return {"kind": "start", "model": model, "arch": "a", "family": "f", "experts": 4 if dense else 0, "dense": dense,
                "params": 1, "params_active": 1, "flops_per_token": 1}

    def points(model, nlls):
        return [r for i, v in enumerate(nlls) for r in (
            {"kind": "train", "model": model, "tokens": 1000 * (i + 1), "seconds": i + 1.0, "nll": v},
            {"kind": "eval", "model": model, "tokens": 1000 * (i + 1), "valid_nll": v, "train_nll_epoch": v, "router": {}})]

    records = [start("dense", None), *points("dense", [5.0, 4.0, 3.0, 2.0]), {"kind": "done", "model": "dense", "tokens": 4000, "seconds": 4.0},
               start("sparse", "dense"), *points("sparse", [4.9, 3.9])]
    assert set(raw.by_model(records)) == {"dense"}
    rows = analysis.summarize(raw.with_unfinished(records))
    assert rows["sparse"]["partial"] and rows["sparse"]["tokens"] == 2000
    assert rows["sparse"]["valid_ppl_gap_pct"] == pytest.approx(100 * (math.exp(3.9 - 4.0) - 1))
    assert rows["sparse"]["valid_crossover_tokens"] == 1000


def test_runs_of_different_lengths_are_compared_at_equal_tokens():
    """render --until-tokens: a dense run over 4,000 tokens and a sparse one stopped at 2,000 are
    both read as they were at 2,000 (within one update), so the gap is 3.9 against 4.0, not 2.0."""
    def run(model, dense, nlls):
        records = [{"kind": "start", "model": model, "arch": "a", "family": "f", "experts": 4 if dense else 0,
                    "dense": dense, "params": 1, "params_active": 1, "flops_per_token": 1}]
        for i, v in enumerate(nlls):
            records += [{"kind": "train", "model": model, "tokens": 1000 * (i + 1), "seconds": i + 1.0, "nll": v},
                        {"kind": "eval", "model": model, "tokens": 1000 * (i + 1), "valid_nll": v, "train_nll_epoch": v, "router": {}}]
        return records + [{"kind": "done", "model": model, "tokens": 1000 * len(nlls), "seconds": float(len(nlls))}]

    models = raw.by_model(run("dense", None, [5.0, 4.0, 3.0, 2.0]) + run("sparse", "dense", [4.9, 3.9]))
    rows = analysis.summarize(raw.cut_at(models, until_tokens=1900, tokens_per_update=100))
    assert rows["dense"]["tokens"] == 2000 and rows["dense"]["final_valid_nll"] == 4.0
    assert rows["sparse"]["valid_ppl_gap_pct"] == pytest.approx(100 * (math.exp(3.9 - 4.0) - 1))
    assert set(raw.cut_at(models, until_tokens=500, tokens_per_update=100)) == set()  # nothing trained by then


@pytest.mark.slow
def test_short_run_writes_records_table_and_plots_and_resumes(data_bin, tmp_path):
    out = tmp_path / "study_lr0.002"  # a dot in the prefix: files are PREFIX.md, not a replaced suffix
    argv = ["train", "--models", "transformer", "switch_e4", "base_e4", "--data-bin", str(data_bin), "--max-train-tokens", "1536",
            "--tokens-per-update", "512", "--points", "2", "--valid-blocks", "8", "--log-tokens", "512", "--out", str(out),
            "--", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2"]
    study(argv)
    assert raw.records_file(out) == tmp_path / "raw" / "study_lr0.002.jsonl"  # raw records: raw/ next to the rendered files
    records = raw.read_records(tmp_path / "raw" / "study_lr0.002.jsonl")
    models = raw.by_model(records)
    assert set(models) == {"transformer", "switch_e4", "base_e4"}
    switch = models["switch_e4"]
    logged = [r["tokens"] for r in switch["train"]]
    assert logged == sorted(logged) and logged[-1] >= 1536 and logged[0] >= 512
    assert all(math.isfinite(r["nll"]) for r in switch["train"])
    assert len(switch["eval"]) == 2 and set(switch["eval"][-1]["router"]) == {"layers.1.fc1.router", "layers.3.fc1.router"}
    assert "changed" in switch["eval"][-1]["router"]["layers.1.fc1.router"]
    moe = switch["train"][0]["moe"]
    assert "moe_dropped" in moe and any(k.startswith("moe/L1") and k.endswith("_dropped") for k in moe)
    # Base routing: also scored with the training (balanced) routing, the mismatch diagnostic
    base_eval = models["base_e4"]["eval"][-1]
    assert math.isfinite(base_eval["valid_nll_training_routing"]) and "valid_nll_training_routing" not in switch["eval"][-1]
    assert set(base_eval["router"]) == {"layers.1.base_layer"}
    table = (tmp_path / "study_lr0.002.md").read_text()
    assert "| switch_e4 | 4 |" in table and "| transformer | - |" in table
    assert (tmp_path / "study_lr0.002_transformer_moe.png").exists() and (tmp_path / "study_lr0.002_router.png").exists()
    summary = json.loads((tmp_path / "study_lr0.002.json").read_text())["rows"]
    assert summary["switch_e4"]["dense"] == "transformer" and "valid_ppl_gap_pct" in summary["switch_e4"]
    # the same paired batches: both models' online losses were measured on the same tokens
    assert [r["tokens"] for r in models["transformer"]["train"]] == logged
    study(argv)  # rerun: both done, nothing trained again
    again = raw.read_records(tmp_path / "raw" / "study_lr0.002.jsonl")
    assert sum(r["kind"] == "start" for r in again) == 3


def _study_records(seed, runs):
    """Raw records of one study file: runs = {model: (family, E, dense, valid NLLs per evaluation, dropped)};
    router health: entropy 0.95 / 0.8 (two layers), changed 0.3 then 0.05 (second half)."""
    records = [{"kind": "meta", "seed": seed, "command": "x"}]
    for model, (family, experts, dense, nlls, dropped) in runs.items():
        records.append({"kind": "start", "model": model, "family": family, "experts": experts, "dense": dense})
        for i, v in enumerate(nlls):
            records.append({"kind": "train", "model": model, "tokens": 1000 * (i + 1), "nll": v,
                            "moe": {"moe/L1_x_dropped": dropped, "moe/L3_x_dropped": dropped / 2, "moe_dropped": 9.0}})
            router = {} if not experts else {"l1": {"entropy": 0.95, "unused": 0, "changed": 0.3 if i < 2 else 0.05},
                                             "l3": {"entropy": 0.8, "unused": 1, "changed": 0.02}}
            records.append({"kind": "eval", "model": model, "tokens": 1000 * (i + 1), "valid_nll": v, "router": router})
        records.append({"kind": "done", "model": model, "tokens": 1000 * len(nlls)})
    return records


def test_router_summary_pairs_seeds_and_reports_each_target(tmp_path):
    """summary: seeds averaged as exp(mean NLL) and paired with gMLP's run of the same seed; the
    expert counts of seed 1; each target judged from the measured values."""
    from benchmarks.sparsity.router_summary import write_summary

    seed1 = {"gmlp": ("gmlp", 0, None, [5.0, 4.5, 4.2, 4.0], 0.0),
             "smlp_top1_e4": ("smlp_top1", 4, "gmlp", [5.0, 4.4, 4.1, 3.95], 0.0),
             "smlp_top1_e16": ("smlp_top1", 16, "gmlp", [5.0, 4.4, 4.1, 3.9], 0.04),
             "smlp_top1_e64": ("smlp_top1", 64, "gmlp", [5.0, 4.4, 4.1, 3.92], 0.0),
             "smlp_sinkhorn_e16": ("smlp_sinkhorn", 16, "gmlp", [5.0, 4.4, 4.1, 3.98], 0.0),
             "smlp_top1_biased_e16": ("smlp_top1_biased", 16, "gmlp", [5.0, 4.4, 4.1, 3.5], 0.0)}  # one lucky seed
    seed2 = {"gmlp": ("gmlp", 0, None, [5.0, 4.5, 4.2, 4.1], 0.0),
             "smlp_top1_e16": ("smlp_top1", 16, "gmlp", [5.0, 4.4, 4.1, 3.94], 0.02)}
    for name, runs, seed in (("s1", seed1, 1), ("s2", seed2, 2)):
        path = raw.records_file(tmp_path / name)
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in _study_records(seed, runs)))

    with pytest.raises(SystemExit, match="gmlp seed 1 is in two inputs"):
        write_summary(tmp_path / "summary", [str(tmp_path / "s1"), f"{tmp_path / 's1'}:gmlp"])
    with pytest.raises(SystemExit, match="no finished run of transformer"):
        write_summary(tmp_path / "summary", [f"{tmp_path / 's1'}:transformer"])
    rows = write_summary(tmp_path / "summary", [str(tmp_path / "s1"), f"{tmp_path / 's2'}:gmlp,smlp_top1_e16"])
    top1 = rows["smlp_top1_e16"]
    assert top1["valid_ppl"] == pytest.approx(math.exp((3.9 + 3.94) / 2))
    assert top1["vs_dense_by_seed_pct"] == pytest.approx({"1": 100 * (math.exp(3.9 - 4.0) - 1), "2": 100 * (math.exp(3.94 - 4.1) - 1)})
    assert top1["vs_dense_pct"] == pytest.approx(100 * (math.exp((3.9 - 4.0 + 3.94 - 4.1) / 2) - 1))  # geometric mean of the ratios
    # a router run in one seed is set against gMLP's run of that seed, not gMLP's mean over seeds
    assert rows["smlp_sinkhorn_e16"]["vs_dense_pct"] == pytest.approx(100 * (math.exp(3.98 - 4.0) - 1))
    assert top1["seeds"]["1"]["entropy_min"] == 0.8 and top1["seeds"]["1"]["unused"] == 1
    assert top1["seeds"]["1"]["changed_late_max"] == 0.05  # evaluations past half the pass only
    assert top1["seeds"]["1"]["train_dropped_max"] == 0.04  # per layer, not the summary over layers
    md = (tmp_path / "summary.md").read_text()
    targets = md.split("## Targets")[1]
    assert "in the most seeds, sMLP, 16 experts): `smlp_top1_e16`" in targets  # not the single-seed router
    assert "-9.5%, -14.8% (2 seeds) | yes |" in targets  # below gMLP by more than 6% in each seed
    assert "(steps -4.9%, +2.0%) | no |" in targets  # E = 16 -> 64 got worse
    assert "entropy 0.800 (worst layer and seed), changed 0.050 (largest, last half) | no |" in targets
    assert "| training and evaluation route identically | only where nothing is dropped" in targets
