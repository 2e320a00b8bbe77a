"""The router study's summary over its result files (seeds, expert counts, the Transformer side):
PREFIX.md and PREFIX.json, with the study's targets and their measured values.

python -m benchmarks.sparsity summary --out benchmarks/results/sparsity_router_summary \
    --inputs benchmarks/results/sparsity_router_study benchmarks/results/sparsity_router_study_seed2 ...

Every figure is read from the inputs' raw records (benchmarks/results/raw/NAME.jsonl); a model
appears in as many seeds as the inputs hold it finished. Perplexities averaged over seeds are
exp(mean valid NLL), the geometric mean."""
import json
import math
import re
from pathlib import Path

from benchmarks.sparsity.records import by_model, output_file, read_records, records_file
from fairseq_smlp.atomic_write import atomic_write_text

# how each tMoE router's training routing relates to its evaluation routing (docs/routers.md)
SAME_ROUTING = {
    "smlp": "no: balanced assignment in training, greedy in evaluation",
    "smlp_top1": "only where nothing is dropped: training drops beyond capacity 1.25",
    "smlp_top1_dropless": "yes (tested)",
    "smlp_sinkhorn": "no: Sinkhorn-balanced in training, greedy in evaluation",
    "smlp_top1_biased": "yes (tested)",
    "smlp_top1_biased_z": "yes (tested)",
    "smlp_top1_biased_r01": "yes (tested)",
    "smlp_causal_balanced": "yes (tested)",
}
TARGET_GAIN_PCT, TARGET_STEP_PCT, TARGET_ENTROPY, TARGET_CHANGED = -6.0, -1.0, 0.9, 0.10


def split_input(spec: str):
    """'PREFIX' (every finished model) or 'PREFIX:MODEL,MODEL' (only those) -> (Path, set or None)."""
    prefix, _, names = spec.partition(":")
    return Path(prefix), set(names.split(",")) if names else None


def load_runs(inputs):
    """[(seed, model, {"start", "train", "eval", "done"})] over every input's finished models."""
    runs, seen = [], set()
    for spec in inputs:
        prefix, wanted = split_input(spec)
        records = read_records(records_file(prefix))
        metas = [r for r in records if r["kind"] == "meta"]
        if not metas:
            raise SystemExit(f"{records_file(prefix)}: no records (--inputs {spec})")
        seed = metas[-1]["seed"]
        models = by_model(records)
        missing = sorted((wanted or set()) - set(models))
        if missing:
            raise SystemExit(f"--inputs {spec}: no finished run of {', '.join(missing)} in {records_file(prefix)}")
        for name, m in models.items():
            if wanted is None or name in wanted:
                if (seed, name) in seen:
                    raise SystemExit(f"--inputs: {name} seed {seed} is in two inputs; name the models to take with PREFIX:MODEL,...")
                seen.add((seed, name))
                runs.append((seed, name, m))
    return runs


def run_row(m) -> dict:
    """One finished run: final valid NLL, and the evaluation routing's health (per layer, worst)."""
    evals = m["eval"]
    half = m["done"]["tokens"] / 2
    layers = evals[-1]["router"]
    late = [r["changed"] for e in evals if e["tokens"] > half for r in e["router"].values() if "changed" in r]
    dropped = [v for k, v in m["train"][-1]["moe"].items() if k.endswith("_dropped") and k.startswith("moe/")]
    return {
        "valid_nll": evals[-1]["valid_nll"], "tokens": m["done"]["tokens"],
        "entropy_min": min((r["entropy"] for r in layers.values()), default=None),
        "unused": sum(r["unused"] for r in layers.values()),
        "changed_late_max": max(late, default=None),
        "train_dropped_max": max(dropped, default=None),
    }


def summarize_runs(runs) -> dict:
    """model -> {family, experts, dense, seeds: {seed: run_row}, valid_ppl (geometric mean)}."""
    out = {}
    for seed, name, m in runs:
        s = m["start"]
        row = out.setdefault(name, {"family": s["family"], "experts": s["experts"], "dense": s["dense"], "seeds": {}})
        row["seeds"][str(seed)] = run_row(m)
    for row in out.values():
        nll = [r["valid_nll"] for r in row["seeds"].values()]
        row["valid_ppl"] = math.exp(sum(nll) / len(nll))
    for row in out.values():
        dense = out.get(row["dense"]) if row["dense"] else None
        paired = {seed: r["valid_nll"] - dense["seeds"][seed]["valid_nll"]
                  for seed, r in row["seeds"].items() if dense and seed in dense["seeds"]}
        if paired:  # by seed: against the dense run of the same seed
            row["vs_dense_by_seed_pct"] = {seed: 100 * (math.exp(d) - 1) for seed, d in paired.items()}
            row["vs_dense_pct"] = 100 * (math.exp(sum(paired.values()) / len(paired)) - 1)  # geometric mean of the ratios
    return out


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _seeds(row, key, fmt):
    return " / ".join(_f(row["seeds"][s].get(key), fmt) for s in sorted(row["seeds"]))


def _ppls(row):
    return " / ".join(f"{math.exp(row['seeds'][s]['valid_nll']):.2f}" for s in sorted(row["seeds"]))


def router_table(rows) -> list:
    names = sorted((n for n, r in rows.items() if r["dense"] == "gmlp" and r["experts"] == 16 and r["family"] in SAME_ROUTING),
                   key=lambda n: rows[n].get("vs_dense_pct", math.inf))
    lines = [
        "| model | seeds | valid ppl (by seed) | valid ppl (mean) | vs gMLP (by seed) | vs gMLP (mean) | "
        "eval entropy, worst layer | unused | changed, late max | training dropped | training = evaluation routing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if "gmlp" in rows:
        g = rows["gmlp"]
        lines.append(f"| gmlp | {len(g['seeds'])} | {_ppls(g)} | {g['valid_ppl']:.2f} | - | - | - | - | - | - | - |")
    for n in names:
        r = rows[n]
        by_seed = " / ".join(f"{v:+.1f}%" for _, v in sorted(r.get("vs_dense_by_seed_pct", {}).items())) or "-"
        lines.append(
            f"| {n} | {len(r['seeds'])} | {_ppls(r)} | "
            f"{r['valid_ppl']:.2f} | {by_seed} | {_f(r.get('vs_dense_pct'), '+.1f')}% | {_seeds(r, 'entropy_min', '.3f')} | "
            f"{_seeds(r, 'unused', 'd')} | {_seeds(r, 'changed_late_max', '.3f')} | {_seeds(r, 'train_dropped_max', '.4f')} | "
            f"{SAME_ROUTING[r['family']]} |"
        )
    return lines


def expert_counts(rows, seed: str = "1") -> dict:
    """family -> {E: valid ppl of `seed`} for the sMLP families run at more than one expert count."""
    families = {}
    for n, r in rows.items():
        if r["dense"] == "gmlp" and re.fullmatch(r".*_e\d+", n) and seed in r["seeds"]:
            families.setdefault(r["family"], {})[r["experts"]] = math.exp(r["seeds"][seed]["valid_nll"])
    return {f: dict(sorted(c.items())) for f, c in families.items() if len(c) > 1}


def expert_table(counts) -> list:
    lines = ["| family | " + " | ".join(f"E = {e}" for e in (4, 16, 64)) + " | each step at least 1% better |", "|---|---:|---:|---:|---|"]
    for family, by_e in sorted(counts.items()):
        cells = [f"{by_e[e]:.2f}" if e in by_e else "-" for e in (4, 16, 64)]
        steps = [100 * (by_e[b] / by_e[a] - 1) for a, b in zip(by_e, list(by_e)[1:])]
        met = "yes" if len(by_e) == 3 and all(s <= TARGET_STEP_PCT for s in steps) else "no"
        lines.append(f"| {family} | {' | '.join(cells)} | {met} ({', '.join(f'{s:+.1f}%' for s in steps)}) |")
    return lines


def transformer_table(rows) -> list:
    names = sorted((n for n, r in rows.items() if r["dense"] == "transformer"), key=lambda n: rows[n]["valid_ppl"])
    lines = ["| model | seeds | valid ppl | vs Transformer |", "|---|---:|---:|---:|"]
    if "transformer" in rows:
        lines.append(f"| transformer | {len(rows['transformer']['seeds'])} | {rows['transformer']['valid_ppl']:.2f} | - |")
    for n in names:
        r = rows[n]
        label = f"{n} (`top1`: Switch's own router)" if r["family"] == "switch" else n
        lines.append(f"| {label} | {len(r['seeds'])} | {r['valid_ppl']:.2f} | {_f(r.get('vs_dense_pct'), '+.1f')}% |")
    return lines


def targets(rows, counts) -> list:
    """The study's four targets against the best router (largest mean gain over gMLP among those run
    in the most seeds, sMLP, E = 16)."""
    routed = {n: r for n, r in rows.items() if r["dense"] == "gmlp" and r["experts"] == 16 and "vs_dense_pct" in r and r["family"] in SAME_ROUTING}
    if not routed:
        return []
    most_seeds = max(len(r["seeds"]) for r in routed.values())  # a lucky single seed does not win
    best = min((n for n in routed if len(routed[n]["seeds"]) == most_seeds), key=lambda n: routed[n]["vs_dense_pct"])
    r = routed[best]
    worst_seed = max(r["vs_dense_by_seed_pct"].values())
    entropy = min(s["entropy_min"] for s in r["seeds"].values())
    changed = max((s["changed_late_max"] for s in r["seeds"].values() if s["changed_late_max"] is not None), default=None)
    family_counts = counts.get(r["family"], {})
    steps = [100 * (b / a - 1) for a, b in zip(family_counts.values(), list(family_counts.values())[1:])]
    same = SAME_ROUTING[r["family"]]
    return [
        f"Best router (largest mean gain over gMLP among the routers run in the most seeds, sMLP, 16 experts): `{best}`.", "",
        "| target | measured | met |", "|---|---|---|",
        f"| at least 6% below gMLP in every seed | {', '.join(f'{v:+.1f}%' for _, v in sorted(r['vs_dense_by_seed_pct'].items()))} "
        f"({len(r['seeds'])} seeds) | {'yes' if worst_seed <= TARGET_GAIN_PCT else 'no'} |",
        "| E = 4 < 16 < 64, each step at least 1% better | "
        + (", ".join(f"E = {e}: {p:.2f}" for e, p in family_counts.items()) + f" (steps {', '.join(f'{s:+.1f}%' for s in steps)})" if steps else "not run")
        + f" | {'yes' if len(family_counts) == 3 and all(s <= TARGET_STEP_PCT for s in steps) else 'no'} |",
        f"| evaluation load entropy at least 0.9 in every layer, under 10% of tokens changing expert over the last half | "
        f"entropy {entropy:.3f} (worst layer and seed), changed {_f(changed, '.3f')} (largest, last half) | "
        f"{'yes' if entropy >= TARGET_ENTROPY and changed is not None and changed < TARGET_CHANGED else 'no'} |",
        f"| training and evaluation route identically | {same} | {'yes' if same.startswith('yes') else 'no'} |",
    ]


def write_summary(out: Path, inputs) -> dict:
    rows = summarize_runs(load_runs(inputs))
    counts = expert_counts(rows)
    command = "python -m benchmarks.sparsity summary --out " + str(out) + " --inputs " + " ".join(str(p) for p in inputs)
    lines = [
        "# The router study: summary", "",
        f"Command: `{command}`", "",
        "Inputs: " + ", ".join(f"[{p.name}.md]({p.name}.md)" + (f" ({', '.join(sorted(names))})" if names else "")
                               for p, names in map(split_input, inputs))
        + " (each with its commands, settings and commits). Valid ppl: the last validation of the single pass; "
        "the mean over seeds is exp(mean NLL). vs gMLP by seed: against gMLP's run of the same seed; "
        "vs gMLP (mean): the geometric mean of those ratios. Rows sorted by it.", "",
        "## Which tMoE router (sMLP, 16 experts)", "", *router_table(rows), "",
        "Eval entropy, worst layer: the evaluation routing's load entropy (1 = balanced) at the last validation, "
        "the lower of the two MoE layers. Changed, late max: the largest share of validation tokens whose expert "
        "changed between two successive validations in the second half of the pass, over the layers. Training "
        "dropped: share of tokens dropped by capacity in the last training interval, the worst layer.", "",
        "## More experts (sMLP, seed 1)", "", *expert_table(counts), "",
        "## The routers in Switch's place (Transformer MoE, 16 experts)", "", *transformer_table(rows), "",
        "## Targets", "", *targets(rows, counts), "",
    ]
    atomic_write_text(output_file(out, ".md"), "\n".join(lines))
    atomic_write_text(output_file(out, ".json"), json.dumps({"command": command, "rows": rows, "expert_counts": counts}, indent=2) + "\n")
    print(f"wrote {out}.md, {out}.json")
    return rows
