"""The study's analysis: where a sparse curve passes its dense counterpart's, and each model's summary row."""
import math


def paired_crossover(sparse, dense, key="nll"):
    """Token count from which the sparse curve stays below the dense one to the end (points
    paired by index: the same batches), or None if it is not below at the end.
    sparse, dense: lists of {"tokens", key}."""
    n = min(len(sparse), len(dense))
    if n == 0 or sparse[n - 1][key] >= dense[n - 1][key]:
        return None
    k = n - 1
    while k > 0 and sparse[k - 1][key] < dense[k - 1][key]:
        k -= 1
    return sparse[k]["tokens"]


def tail_mean(points, key, share=0.1):
    """Mean of `key` over the last `share` of the points (the end of the pass, less noisy than one interval)."""
    k = max(1, round(len(points) * share))
    return sum(p[key] for p in points[-k:]) / k


def summarize(models: dict) -> dict:
    rows = {}
    for name, m in models.items():
        start, train, evals = m["start"], m["train"], m["eval"]
        row = {
            "arch": start["arch"], "family": start["family"], "experts": start["experts"], "dense": start["dense"],
            "params": start["params"], "params_active": start["params_active"], "flops_per_token": start["flops_per_token"],
            "tokens": m["done"]["tokens"], "seconds": m["done"]["seconds"],
            "final_online_nll": tail_mean(train, "nll"), "final_valid_nll": evals[-1]["valid_nll"] if evals else None,
            "final_train_nll_epoch": evals[-1]["train_nll_epoch"] if evals else None,
            "best_valid_nll": min(e["valid_nll"] for e in evals) if evals else None,
            "partial": bool(m.get("partial")),
        }
        dense = models.get(start["dense"]) if start["dense"] else None
        if dense and m.get("partial"):  # compare at the tokens the partial run reached
            dense = {"train": dense["train"][: len(train)], "eval": dense["eval"][: len(evals)]}
        if dense and dense["train"] and dense["eval"]:
            row["online_crossover_tokens"] = paired_crossover(train, dense["train"], "nll")
            row["valid_crossover_tokens"] = paired_crossover(evals, dense["eval"], "valid_nll")
            d_online, d_valid = tail_mean(dense["train"], "nll"), dense["eval"][-1]["valid_nll"]
            row["online_ppl_gap_pct"] = 100 * (math.exp(row["final_online_nll"] - d_online) - 1)
            row["valid_ppl_gap_pct"] = 100 * (math.exp(row["final_valid_nll"] - d_valid) - 1)
        routers = evals[-1]["router"] if evals else {}
        if routers:
            row["router_entropy"] = sum(r["entropy"] for r in routers.values()) / len(routers)
            row["router_unused"] = sum(r["unused"] for r in routers.values())
            changed = [r["changed"] for r in routers.values() if "changed" in r]
            row["router_changed"] = sum(changed) / len(changed) if changed else None
        rows[name] = row
    return rows

