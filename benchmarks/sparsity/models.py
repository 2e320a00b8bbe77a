"""The study's models and regimes: each sparse family against its dense counterpart, by expert count."""

EXPERTS = (1, 4, 16, 64)
EXPERT_DROPOUT = 0.4
DENSE = {"gmlp": ("gmlp_lm_tiny", []), "transformer": ("transformer_lm_tiny", [])}
# the router study: sMLP's tMoE routed otherwise (docs/routers.md), family smlp_<name>
ROUTERS = {
    "top1": ["--tmoe-router", "top1"],
    "top1_global": ["--tmoe-router", "top1", "--tmoe-balance-scope", "global-batch"],
    "top1_dropless": ["--tmoe-router", "top1", "--tmoe-train-capacity-factor", "0"],  # nothing dropped in training
    "top1_biased": ["--tmoe-router", "top1_biased"],
    "top1_biased_r01": ["--tmoe-router", "top1_biased", "--tmoe-bias-update-rate", "0.01"],  # 10x the default step
    # with ST-MoE's router z-loss (0.1 x --moe-aux-loss-weight 0.01 = 1e-3): keeps the sigmoid unsaturated
    "top1_biased_z": ["--tmoe-router", "top1_biased", "--tmoe-router-z-loss", "0.1"],
    "sinkhorn": ["--tmoe-router", "sinkhorn"],
    "causal_balanced": ["--tmoe-router", "causal_balanced"],
}


def sparse_models():
    """name -> (arch, extra fairseq args, dense counterpart, family, E)."""
    models = {}
    for e in EXPERTS:
        models[f"smlp_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", str(e)], "gmlp", "smlp", e)
        if e > 1:
            models[f"smlp_tmoe_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", "1", "--tmoe-experts", str(e)], "gmlp", "smlp_tmoe", e)
            models[f"smlp_smoe_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", "1"], "gmlp", "smlp_smoe", e)
            # the tMoE routed otherwise than the paper's Base-layer routing (smlp_top1: Switch)
            for router, flags in ROUTERS.items():
                models[f"smlp_{router}_e{e}"] = ("smlp_lm_tiny", ["--smoe-experts", str(e), "--tmoe-experts", str(e), *flags], "gmlp", f"smlp_{router}", e)
            models[f"switch_e{e}"] = ("switch_lm_tiny", ["--moe-experts", str(e)], "transformer", "switch", e)
            # the same routers in Switch's place in the Transformer MoE (switch_top1 is Switch itself)
            for router, flags in ROUTERS.items():
                if router != "top1":
                    flags = [f.replace("--tmoe-", "--moe-") for f in flags]
                    models[f"switch_{router}_e{e}"] = ("switch_lm_tiny", ["--moe-experts", str(e), *flags], "transformer", f"switch_{router}", e)
            models[f"gshard_e{e}"] = ("gshard_lm_tiny", ["--moe-experts", str(e)], "transformer", "gshard", e)
            models[f"hash_e{e}"] = ("hash_lm_tiny", ["--moe-experts", str(e)], "transformer", "hash", e)
        models[f"base_e{e}"] = ("base_lm_tiny", ["--base-experts", str(e)], "transformer", "base", e)
    # the MoE literature's regularisation for repeated data: dropout inside the experts
    # (Switch Transformers: 0.4 in the experts, 0.1 elsewhere)
    for name in [n for n in models if models[n][4] > 1]:
        arch, extra, dense, family, e = models[name]
        models[f"{name}_xd"] = (arch, extra + ["--expert-dropout", str(EXPERT_DROPOUT)], dense, f"{family}_xd", e)
    return models


MODELS = {**{k: (*v, None, k, 0) for k, v in DENSE.items()}, **sparse_models()}
ROUTED_FAMILIES = {f"{family}_{router}" for router in ROUTERS for family in ("smlp", "switch")}  # the router study
DEFAULT_MODELS = [m for m, spec in MODELS.items() if spec[4] in (0, 1, 4, 16) and not m.endswith("_xd") and spec[3] not in ROUTED_FAMILIES]

REGIMES = {
    "single-pass": dict(corpus="wikitext-2+books-mix", epochs=1, dropout=0.0),
    "repeated": dict(corpus="wikitext-2", epochs=4, dropout=0.1),
}


