"""The study's report: PREFIX.json (summary rows), PREFIX.md (tables) and PREFIX_*.png (curves,
router health), rendered from the raw records."""
import json
import math
from pathlib import Path

from benchmarks.sparsity.analysis import summarize
from benchmarks.sparsity.records import by_model, cut_at, output_file, read_records, records_file, with_unfinished
from fairseq_smlp.atomic_write import atomic_write_text


def _ppl(nll):
    return "-" if nll is None else f"{math.exp(nll):.2f}"


def _tok(t):
    return "does not pass" if t is None else f"{t / 1e6:.2f}M"


def _pct(x):
    return "-" if x is None else f"{x:+.1f}%"


def write_markdown(path: Path, meta: dict, rows: dict) -> None:
    regime = meta["regime"]
    lines = [
        f"# Where sparsity pays: {regime}", "",
        *(["Commands (each appended its models' records to this file):", "",
           *[f"    {c}" for c in meta["commands"]], ""] if len(meta.get("commands", [])) > 1 else [f"Command: `{meta['command']}`", ""]),
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), precision {meta['precision']}. "
        f"Data: {meta['data']}. {meta['epochs']} pass(es), tokens per update {meta['tokens_per_update']}, 128-token blocks, "
        f"Adam lr {meta['lr']} (inverse sqrt, {meta['warmup']} warm-up updates), dropout {meta['dropout']}, seed {meta['seed']}. "
        f"Validation: {meta['valid_blocks']} blocks spread over the validation set, evaluation mode.", "",
    ]
    if meta.get("note"):
        lines += [f"Note: {meta['note']}", ""]
    online = "online train ppl (end of pass)" if regime == "single-pass" else "train ppl (last epoch, training mode)"
    lines += [
        f"| model | E | params total / active | FLOPs/token | {online} | valid ppl | vs dense (online) | vs dense (valid) | "
        "passes dense at (online) | passes dense at (valid) | router entropy / unused / changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(rows, key=lambda n: (rows[n]["dense"] or n, rows[n]["family"], rows[n]["experts"]))
    for name in order:
        r = rows[name]
        train_col = r["final_online_nll"] if regime == "single-pass" else r["final_train_nll_epoch"]
        router = "-"
        if "router_entropy" in r:
            changed = "-" if r.get("router_changed") is None else f"{r['router_changed']:.3f}"
            router = f"{r['router_entropy']:.3f} / {r['router_unused']} / {changed}"
        label = f"{name} (stopped at {r['tokens'] / 1e6:.2f}M tokens)" if r.get("partial") else name
        lines.append(
            f"| {label} | {r['experts'] or '-'} | {r['params'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M | "
            f"{_ppl(train_col)} | {_ppl(r['final_valid_nll'])} | {_pct(r.get('online_ppl_gap_pct'))} | {_pct(r.get('valid_ppl_gap_pct'))} | "
            + (f"{_tok(r.get('online_crossover_tokens'))} | {_tok(r.get('valid_crossover_tokens'))} | " if r["dense"] else "- | - | ")
            + f"{router} |"
        )
    lines += [
        "",
        "vs dense: perplexity of the sparse model over its dense counterpart's (gmlp for sMLP, transformer for the "
        "Transformer MoEs), minus 1; negative = the sparse model is better. Online: mean over the last 10% of the "
        "training intervals (each batch scored before its update). Passes dense at: the token count from which the "
        "sparse curve stays below the dense one to the end (paired intervals / evaluations). A model marked "
        "'stopped at' did not finish the pass (render --partial): it is compared with its dense counterpart at the "
        "same tokens.",
        "Router health at the last evaluation, averaged over the MoE layers: load entropy (1 = balanced), unused "
        "experts (summed over layers), share of tokens whose first expert changed since the previous evaluation.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def write_plots(prefix: Path, meta: dict, models: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {"smlp": "gmlp", "transformer_moe": "transformer"}
    for group, dense in groups.items():
        names = [n for n, m in models.items() if m["start"]["dense"] == dense or n == dense]
        if len(names) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for name in sorted(names):
            m = models[name]
            style = dict(lw=2.5, color="black") if name == dense else dict(lw=1.2)
            ls = {1: ":", 4: "--", 16: "-", 64: "-."}.get(m["start"]["experts"], "-")
            if meta["regime"] == "single-pass":
                axes[0].plot([p["tokens"] for p in m["train"]], [math.exp(p["nll"]) for p in m["train"]], ls=ls, label=name, **style)
            else:
                axes[0].plot([p["tokens"] for p in m["eval"]], [math.exp(p["train_nll_epoch"]) for p in m["eval"]], ls=ls, label=name, **style)
            axes[1].plot([p["tokens"] for p in m["eval"]], [math.exp(p["valid_nll"]) for p in m["eval"]], ls=ls, marker="o", ms=3, label=name, **style)
        axes[0].set_title("online training ppl (each batch before its update)" if meta["regime"] == "single-pass" else "training ppl (epoch so far, training mode)")
        axes[1].set_title("validation ppl (held out)")
        for ax in axes:
            ax.set_xlabel("training tokens")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        all_final = [math.exp(p["valid_nll"]) for n in names for p in models[n]["eval"][-3:]]
        if all_final:
            lo, hi = min(all_final), max(all_final)
            for ax in axes:
                ax.set_ylim(lo * 0.9, hi * 2.5)
        axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{meta['regime']}: {group} vs {dense} ({meta['data']})")
        fig.tight_layout()
        out = f"{prefix}_{group}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    written += write_router_plot(prefix, meta, models, plt)
    return written


def write_router_plot(prefix: Path, meta: dict, models: dict, plt) -> list:
    """Router health along the curves: load entropy and the share of tokens whose expert changed
    since the previous evaluation, each averaged over the model's routers."""
    routed = {n: m for n, m in models.items() if any(e["router"] for e in m["eval"])}
    if not routed:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in sorted(routed):
        evals = [e for e in routed[name]["eval"] if e["router"]]
        tokens = [e["tokens"] for e in evals]
        ls = {4: "--", 16: "-", 64: "-."}.get(routed[name]["start"]["experts"], ":")
        mean = lambda e, k: sum(r.get(k, float("nan")) for r in e["router"].values()) / len(e["router"])  # noqa: E731
        axes[0].plot(tokens, [mean(e, "entropy") for e in evals], ls=ls, label=name)
        axes[1].plot(tokens, [sum(r["unused"] for r in e["router"].values()) for e in evals], ls=ls, label=name)
        axes[2].plot(tokens[1:], [mean(e, "changed") for e in evals[1:]], ls=ls, label=name)
    titles = ("load entropy (1 = balanced), evaluation routing", "unused experts (all layers)", "tokens whose expert changed since the previous evaluation")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens")
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{meta['regime']}: router health on the validation blocks")
    fig.tight_layout()
    out = f"{prefix}_router.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out]



def render(prefix: Path, partial: bool = False, until_tokens: int = 0) -> None:
    records = read_records(records_file(prefix))
    metas = [r for r in records if r["kind"] == "meta"]
    if not metas:
        raise SystemExit(f"{records_file(prefix)}: no records")
    meta = {**metas[-1], "commands": list(dict.fromkeys(m["command"] for m in metas))}
    models = with_unfinished(records) if partial else by_model(records)
    if until_tokens:
        models = cut_at(models, until_tokens, meta["tokens_per_update"])
        meta = {**meta, "note": f"{meta.get('note') or ''} Every model as it was at {until_tokens:,} training tokens (render --until-tokens).".strip()}
    rows = summarize(models)
    atomic_write_text(output_file(prefix, ".json"), json.dumps({"meta": meta, "invocations": metas, "rows": rows}, indent=2) + "\n")
    write_markdown(output_file(prefix, ".md"), meta, rows)
    plots = write_plots(prefix, meta, models)
    print(f"wrote {prefix}.json, {prefix}.md, {', '.join(plots)}")

