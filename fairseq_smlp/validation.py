"""One place that checks the numbers every command of the plugin takes.

    FLAGS       flag -> its allowed range (finite, in range, integer where it must be)
    RELATIONS   checks between flags (--max-tokens >= --tokens-per-sample, ...)
    check_config(obj)         every flag found on a config / argparse namespace / fairseq cfg
    check_args(parser, args)  the same for a command's own argparse options (parser.error)

fairseq validates almost none of its numbers: `--decoder-layers 0` trains an embedding-only
model, `--max-tokens 32 --tokens-per-sample 64` trains on the few short blocks with one warning,
`--dropout 1.5` fails deep inside torch. fairseq_patches.py runs check_config on the full cfg
of every fairseq command before it acts; the models run it on their own config in build_model
(the Python API path); our own commands (quickstart, reshard, launch_cpu, flops, dry_run,
data_prep, the zero-shot evaluator) run check_args after parsing. An error names the flag, the value and the range:

    --dropout must be in [0, 1), got 1.5
"""
import ast
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple


class FlagError(ValueError):
    """A flag's value outside its range, or two flags that contradict each other."""


@dataclass(frozen=True)
class Range:
    """Allowed values of one flag: [low, high] (either end open or absent), finite, and an
    integer where `integer`; `special` values outside the range keep their own meaning."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    special: Tuple[Tuple[float, str], ...] = ()  # ((value, meaning), ...)
    note: str = ""  # what a value in the range means, when that is not obvious (0: no limit)

    def allows(self, value) -> bool:
        if any(value == v for v, _ in self.special):
            return True
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self, value=None) -> str:
        """'in [0, 1)', '>= 1', ...; 'an integer >= 1' when `value` is not one."""
        kind = "an integer " if self.integer and not _is_integer(value) else ""
        if isinstance(value, (int, float)) and not math.isfinite(value):
            kind = "a finite number "
        if self.low is not None and self.high is not None:
            low, high = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind}in {low}{_num(self.low)}, {_num(self.high)}{high}"
        elif self.low is not None:
            text = f"{kind}{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind}{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "an integer" if self.integer else "a finite number"
        for special, meaning in self.special:
            text += f" or {_num(special)} ({meaning})"
        return text + (f" ({self.note})" if self.note else "")


def _is_integer(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer())


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def count(low=1, **kw) -> Range:
    return Range(low=low, integer=True, **kw)


PROBABILITY = Range(0, 1, high_open=True)
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
SEED = Range(0, 2 ** 32 - 1, integer=True)  # numpy's seeds
UNLIMITED = (-1, "no limit")

# Every numeric flag of the plugin's dataclasses (SmlpConfig, MoETransformerLanguageModelConfig
# with what it inherits from fairseq's transformer_lm, MoECrossEntropyConfig), the fairseq flags
# our runs depend on, and our commands' own options. tests/integration/test_bad_input.py checks that no
# numeric dataclass field is missing here.
FLAGS: Dict[str, Range] = {
    # ---- data and batches (fairseq task / dataset / eval-lm)
    "--tokens-per-sample": count(),
    "--max-target-positions": count(),
    "--max-tokens": count(),
    "--max-tokens-valid": count(),
    "--batch-size": count(),
    "--batch-size-valid": count(),
    "--required-batch-size-multiple": count(),
    "--num-workers": count(0),
    "--update-freq": count(),
    "--context-window": count(0),
    # ---- optimisation
    "--lr": POSITIVE,
    "--max-update": count(0, note="0: no limit"),
    "--max-epoch": count(0, note="0: no limit"),
    "--stop-time-hours": Range(0, note="0: no limit"),
    "--clip-norm": Range(0, note="0: no clipping"),
    "--weight-decay": NON_NEGATIVE,
    "--adam-betas": PROBABILITY,
    "--adam-eps": POSITIVE,
    "--warmup-updates": count(0),
    "--warmup-init-lr": Range(0, special=((-1, "fairseq's default"),)),
    "--seed": SEED,
    # ---- checkpoints, logging, workers
    "--log-interval": count(),
    "--save-interval": count(),
    "--save-interval-updates": count(0, note="0: only at epoch ends"),
    "--validate-interval": count(),
    "--validate-interval-updates": count(0),
    "--keep-last-epochs": count(0, special=(UNLIMITED,)),
    "--keep-interval-updates": count(0, special=(UNLIMITED,)),
    "--keep-best-checkpoints": count(0, special=(UNLIMITED,)),
    "--distributed-world-size": count(),
    "--distributed-rank": count(0),
    # ---- model sizes (fairseq's transformer_lm and ours)
    "--decoder-layers": count(),
    "--decoder-embed-dim": count(),
    "--decoder-ffn-embed-dim": count(),
    "--decoder-input-dim": count(),
    "--decoder-output-dim": count(),
    "--decoder-attention-heads": count(),
    "--dropout": PROBABILITY,
    "--attention-dropout": PROBABILITY,
    "--activation-dropout": PROBABILITY,
    "--relu-dropout": PROBABILITY,
    "--adaptive-softmax-dropout": PROBABILITY,
    "--decoder-layerdrop": PROBABILITY,
    "--quant-noise-pq": PROBABILITY,
    "--quant-noise-scalar": PROBABILITY,
    "--quant-noise-pq-block-size": count(),
    "--adaptive-softmax-factor": POSITIVE,
    "--adaptive-input-factor": POSITIVE,
    "--character-embedding-dim": count(),
    "--char-embedder-highway-layers": count(0),
    "--min-params-to-wrap": count(0),
    "--base-layers": count(0),
    "--base-sublayers": count(),
    "--base-shuffle": Range(0, 1, integer=True, note="0 or 1"),
    # ---- sMLP (SmlpConfig)
    "--sparse-every": count(0, note="0: every block dense"),
    "--smoe-experts": count(),
    "--tmoe-experts": count(),
    "--tmoe-ffn-embed-dim": count(),
    "--partial-prefix-ratio": Range(0, 1, low_open=True, high_open=True),
    "--spatial-init-eps": NON_NEGATIVE,
    "--expert-dropout": PROBABILITY,  # also the baselines'
    "--tmoe-bias-update-rate": Range(0, note="0: the bias never moves"),
    "--tmoe-router-z-loss": NON_NEGATIVE,
    "--tmoe-train-capacity-factor": Range(note="<= 0: no limit"),
    # ---- Transformer-MoE baselines (MoETransformerLanguageModelConfig)
    "--moe-freq": count(0, note="0: no MoE layer"),
    "--moe-experts": count(),
    "--moe-expert-ffn-dim": count(0, note="0: --decoder-ffn-embed-dim"),
    "--moe-train-capacity-factor": Range(note="<= 0: no limit"),
    "--moe-eval-capacity-factor": Range(note="<= 0: no limit"),
    "--moe-router-z-loss": NON_NEGATIVE,
    "--moe-bias-update-rate": Range(0, note="0: the bias never moves"),
    "--hash-seed": SEED,
    "--base-experts": count(0, note="0: one per worker"),
    # ---- criterion (MoECrossEntropyConfig)
    "--moe-aux-loss-weight": NON_NEGATIVE,
    # ---- our commands' own options
    "--minutes": POSITIVE,  # quickstart
    "--updates": count(),  # quickstart
    "--vocab-size": count(8),  # quickstart, data_prep, dry_run
    "--workers": count(),  # data_prep
    "--valid-fraction": Range(0, 1, low_open=True, high_open=True),  # data_prep.paper_corpus
    "--spm-max-sentences": count(0, note="0: every line"),
    "--to-world-size": count(),  # checkpoints reshard
    "--nprocs": count(),  # distributed.launch_cpu
    "--port": count(0, high=65535, note="0: a free port"),
    "--seq-len": count(),  # flops
    "--vocab": count(),
    "--base-workers": count(),
    "--world-size": count(),  # dry_run
    "--experts-per-worker": count(0, note="0: any"),
    "--width-divisor": count(),
    "--length": count(),
    "--gpu-peak-tflops": POSITIVE,
    "--utilisation": Range(0, 1, low_open=True),
    "--max-examples": count(),  # zero-shot
}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_pair(value):
    """--adam-betas arrives as the string '(0.9, 0.98)'."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = None
    if not hasattr(parsed, "__len__") or isinstance(parsed, str) or len(parsed) != 2:
        raise FlagError(f"--adam-betas must be a pair like '(0.9, 0.98)', got {value!r}")
    return parsed


PARSERS: Dict[str, Callable] = {"--adam-betas": _parse_pair}


def _items(value) -> list:
    """A flag's numbers: lists (--lr 0.1,0.01, --update-freq) are checked item by item."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def check_value(flag: str, value) -> None:
    """Raise FlagError if `value` is outside FLAGS[flag]; None (unset) passes."""
    if value is None or flag not in FLAGS:
        return
    value = PARSERS.get(flag, lambda v: v)(value)
    rng = FLAGS[flag]
    for item in _items(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise FlagError(f"{flag} must be a number {rng.describe()}, got {value!r}")
        if not rng.allows(item):
            shown = value if len(_items(value)) == 1 else f"{item} (in {value})"
            raise FlagError(f"{flag} must be {rng.describe(item)}, got {shown}")


# ------------------------------------------------------------------ reading configs
FAIRSEQ_GROUPS = ("common", "dataset", "optimization", "checkpoint", "distributed_training", "task", "model",
                  "criterion", "optimizer", "lr_scheduler", "eval_lm")


def _get(obj, name: str):
    """obj.name, or None where it is absent or an unresolvable interpolation (a model config
    on its own cannot resolve ${task.tokens_per_sample})."""
    try:
        value = getattr(obj, name, None)
    except Exception:  # omegaconf: missing key in struct mode, interpolation to nowhere
        return None
    if isinstance(value, str) and value.startswith("${"):  # a dataclass default II("task....")
        return None
    return value


def _names(obj) -> List[str]:
    if obj is None:
        return []
    if hasattr(obj, "keys"):  # DictConfig, dict
        return [str(k) for k in obj.keys()]
    if hasattr(obj, "__dataclass_fields__"):
        return list(obj.__dataclass_fields__)
    return list(vars(obj))


class Flat:
    """A view of several config groups as one: get(name) is the first value set."""

    def __init__(self, groups):
        self.groups = [g for g in groups if g is not None]

    def get(self, name: str):
        for group in self.groups:
            value = _get(group, name)
            if value is not None:
                return value
        return None

    def names(self) -> List[str]:
        return sorted({n for g in self.groups for n in _names(g)})


def _flat(cfg) -> Flat:
    if all(hasattr(cfg, g) for g in ("common", "dataset", "optimization")):  # a fairseq cfg
        return Flat([_get(cfg, g) for g in FAIRSEQ_GROUPS])
    return Flat([cfg])


# ------------------------------------------------------------------ relations between flags
def _batch_holds_a_sample(get) -> Optional[str]:
    tokens = get("tokens_per_sample")
    for name in ("max_tokens", "max_tokens_valid"):
        limit = get(name)
        if tokens is not None and limit is not None and limit < tokens:
            return (f"{flag_of(name)} {limit} is smaller than --tokens-per-sample {tokens}: no full-length sample fits "
                    f"in a batch (fairseq would skip them and train or score on the rest); raise {flag_of(name)} "
                    f"to at least {tokens} or lower --tokens-per-sample")
    return None


def _context_window_leaves_tokens(get) -> Optional[str]:
    window, tokens = get("context_window"), get("tokens_per_sample")
    if window and tokens is not None and window >= tokens:
        return (f"--context-window {window} must be smaller than --tokens-per-sample {tokens} "
                "(fairseq-eval-lm scores tokens_per_sample - context_window new tokens per block)")
    return None


def _rank_in_world(get) -> Optional[str]:
    rank, world = get("distributed_rank"), get("distributed_world_size")
    if rank is not None and world is not None and rank >= world:
        return f"--distributed-rank {rank} must be < --distributed-world-size {world}"
    return None


def _some_block_is_sparse(get) -> Optional[str]:
    every, layers = get("sparse_every"), get("decoder_layers")
    if every and layers and not get("sparse_layers") and every > layers:
        return (f"--sparse-every {every} with --decoder-layers {layers} makes no block sparse (a dense gMLP); "
                f"use --sparse-every 0 for that on purpose, or a value <= {layers}")
    return None


def _some_layer_is_moe(get) -> Optional[str]:
    freq, layers, router = get("moe_freq"), get("decoder_layers"), get("moe_router")
    if freq and layers and router not in (None, "none") and freq > layers:
        return (f"--moe-freq {freq} with --decoder-layers {layers} gives no MoE layer (a dense Transformer); "
                f"use --moe-freq 0 for that on purpose, or a value <= {layers}")
    return None


def _gate_halves(get) -> Optional[str]:
    ffn = get("decoder_ffn_embed_dim")
    if get("sparse_every") is not None and ffn is not None and ffn % 2:  # an sMLP config
        return f"--decoder-ffn-embed-dim {ffn} must be even: every gMLP block splits it into two halves"
    return None


def _heads_divide_width(get) -> Optional[str]:
    heads, dim = get("decoder_attention_heads"), get("decoder_embed_dim")
    if heads and dim and dim % heads:
        return f"--decoder-attention-heads {heads} must divide --decoder-embed-dim {dim}"
    return None


RELATIONS: List[Callable] = [
    _batch_holds_a_sample, _context_window_leaves_tokens, _rank_in_world,
    _some_block_is_sparse, _some_layer_is_moe, _gate_halves, _heads_divide_width,
]


# ------------------------------------------------------------------ entry points
def check_config(cfg) -> None:
    """Check every flag of FLAGS found on `cfg` (a fairseq cfg, a model/criterion config,
    an argparse namespace), then the relations; the first problem raises FlagError."""
    flat = _flat(cfg)
    for group in flat.groups:  # each occurrence: a flag may sit in two groups (task, model)
        for name in _names(group):
            check_value(flag_of(name), _get(group, name))
    for relation in RELATIONS:
        problem = relation(flat.get)
        if problem:
            raise FlagError(problem)


def check_args(parser, args) -> None:
    """check_config for a command's own argparse options: a bad value is parser.error."""
    try:
        check_config(args)
    except FlagError as e:
        parser.error(str(e))


def hours_flag(minutes: float) -> str:
    """--stop-time-hours for a budget in minutes, exact: a rounded string ('0.0000') would
    read as 0, which fairseq takes as no limit."""
    check_value("--minutes", minutes)
    text = repr(minutes / 60)
    assert float(text) > 0, text
    return text
