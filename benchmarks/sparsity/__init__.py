"""Where sparsity pays: each sparse family against its dense counterpart, by expert count,
at equal FLOPs per token, on tokens the model has never trained on.

    python -m benchmarks.sparsity train [--regime single-pass|repeated] [--models NAME ...]
        [--precision fp32|bf16] [--lr 2e-3] [--max-train-tokens N] [--out PREFIX] [-- fairseq args]
    python -m benchmarks.sparsity render [--out PREFIX] [--partial]
    python -m benchmarks.sparsity list                      # the model names

Regimes (data prepared once into runs/sparsity/, data_prep.small_corpus):
  single-pass  WikiText-2 train + books-mix train (about 4.1M whitespace tokens, one 8k
               sentencepiece BPE over both), ONE pass (--epochs 1), dropout 0. Loss on unseen
               tokens two ways: the online training loss (every batch is scored by the forward
               that precedes its update: it has never been trained on) and the held-out
               validation loss (WikiText-2 valid + books-mix valid, --valid-blocks blocks spread
               evenly over it, evaluation mode).
  repeated     WikiText-2 only (the same BPE), several passes (--epochs, default 4), dropout 0.1:
               training loss and validation loss side by side, so each model's overfitting gap
               (valid - train) shows.

Models (`list`): the dense counterparts gmlp (gmlp_lm_tiny) and transformer
(transformer_lm_tiny); sMLP with E experts in the sMoE and the tMoE (smlp_eE), in the tMoE only
(smlp_tmoe_eE: one spatial matrix) and in the sMoE only (smlp_smoe_eE: one tMoE expert);
switch_eE, gshard_eE, hash_eE, base_eE; NAME_xd: the same with --expert-dropout 0.4; not in the
default set, sMLP with its tMoE routed otherwise (models.ROUTERS, docs/routers.md): smlp_top1_eE
(like Switch, --tmoe-router top1), smlp_top1_global_eE (the same, --tmoe-balance-scope
global-batch), smlp_top1_biased_eE (smlp_top1_biased_r01_eE: bias step 0.01 instead of 0.001;
smlp_top1_biased_z_eE: with the router z-loss),
smlp_sinkhorn_eE, smlp_causal_balanced_eE; the same routers in Switch's place, switch_ROUTER_eE.
All *_tiny, FLOP-matched (docs/baselines.md): E changes the parameters, not the FLOPs per token. Every model sees the same batches in the same order
(same data, seed, tokens per update), so curves are paired batch by batch.

Router health along the curves (at every evaluation, on the validation blocks, evaluation-mode
routing): load entropy (1.0 = every expert the same load), unused experts, and the share of
tokens whose (first) expert changed since the previous evaluation; the training log's per-batch
statistics (load max/min, dropped tokens, aux loss) averaged over each logging interval.

Output: the raw records DIR/raw/NAME.jsonl for PREFIX = DIR/NAME (records.records_file; the committed
studies' are in benchmarks/results/raw/), one JSON record per line, appended as the run goes (a
killed run loses at most the model in progress; a rerun skips every model already done):
  {"kind": "start", "model", "arch", "args", "params", "params_active", "flops_per_token", "meta"}
  {"kind": "train", "model", "tokens", "updates", "epoch", "nll", "seconds", "moe": {...}}   per interval
  {"kind": "eval",  "model", "tokens", "updates", "epoch", "valid_nll", "train_nll_epoch", "router": {...}}
  {"kind": "done",  "model", "seconds", "tokens"}
nll in nats per token. `render` writes PREFIX.json (summary), PREFIX.md (tables: final losses,
the token count at which each sparse model passes its dense counterpart) and PREFIX_*.png.

Modules: models (the names, regimes), train (data, one model's run, router probe), records (the
raw .jsonl), analysis (crossovers, summary rows), report (markdown, plots, `render`), cli.
"""
