"""Score multiple-choice examples by language-model log-likelihood.

For each candidate, the model reads ``eos + context + continuation`` and we sum the
log-probabilities of the continuation tokens. Each example gets one prediction per rule:

    acc            highest summed log-likelihood
    acc_norm       highest log-likelihood per character of the continuation text
    acc_bytes      highest log-likelihood per UTF-8 byte of the continuation text
    acc_per_token  highest mean log-likelihood per scored token

(acc, acc_norm and acc_bytes are lm-evaluation-harness's rules of the same names.) A
task's ``accuracy`` is its published convention: acc_per_token for length-normalised
tasks (HellaSwag), acc otherwise. Ties go to the first candidate.

Scores do not depend on batching (see SpanScorer). The model is any fairseq language
model: ``model(src_tokens, src_lengths=...)`` returns ``net_output`` and
``model.get_normalized_probs(net_output, log_probs=True)`` gives log-probabilities of
shape (batch, time, vocab).
"""
import re
import string
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .text import TextEncoder, light_tokenize  # noqa: F401  (text -> ids; re-exported)
from .zeroshot_tasks import Example, TaskFileError, TaskSpec

# ----------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One encoded candidate: ``tokens`` = eos + context + continuation (ids), of which
    the last ``n_cont`` are scored; ``truncated`` if context tokens were cut on the left."""

    tokens: List[int]
    n_cont: int
    truncated: bool


def make_candidate(context: List[int], continuation: List[int], eos: int,
                   max_positions: Optional[int] = None, min_context: int = 0) -> Candidate:
    """Join eos + context + continuation, cutting on the LEFT to fit the window.

    The model reads tokens[:-1] and predicts tokens[1:], so a window of max_positions
    input tokens holds max_positions + 1 tokens in all. The context is cut first; a
    continuation too long for the window on its own loses its beginning as well (only
    the tokens left are scored). ``min_context`` > 0 is the routing prefix P of a
    partial-prediction model: its router reads input positions < P, and predictions there
    see the future, so at least P tokens must precede every scored token; shorter
    contexts get extra eos in front (empty documents before this one).
    """
    if not continuation:
        raise ValueError("a continuation encodes to no tokens; nothing to score")
    fill = max(0, min_context - len(context))
    tokens = [eos] * (1 + fill) + context + continuation
    n_cont = len(continuation)
    truncated = max_positions is not None and len(tokens) - 1 > max_positions
    if truncated:
        tokens = tokens[-(max_positions + 1):]
        n_cont = min(n_cont, max_positions - min_context)
    return Candidate(tokens, n_cont, truncated)


@dataclass
class CandidateBuilder:
    """Example -> one Candidate per answer: text encoded, joined, fitted to the model."""

    encode: Callable[[str], List[int]]
    eos: int
    max_positions: Optional[int] = None  # the model's window (None: unlimited)
    min_context: int = 0  # routing prefix of partial-prediction models, else 0

    def __call__(self, example: Example) -> List[Candidate]:
        return [make_candidate(self.encode(c), self.encode(x), self.eos, self.max_positions,
                               self.min_context)
                for c, x in zip(example.contexts, example.continuations)]


# ----------------------------------------------------------------------------- the forward


@torch.no_grad()
def token_logprobs(model, sequences: Sequence[Sequence[int]], pad: int, width: int,
                   device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(tokens[t+1] | tokens[:t+1]) of each sequence, in ONE forward of `width` inputs.

    Sequences are padded on the RIGHT (to `width` input positions): sMLP's spatial gating
    mixes tokens by absolute position, so left padding would shift every position and
    change the scores. Returns (log-probs float64, greedy bool), both (B, width): entry
    [b, t] is the target at input position t; entries past a sequence are padding.
    """
    tokens = torch.full((len(sequences), width + 1), pad, dtype=torch.long)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(seq) - 1 for seq in sequences])
    tokens = tokens.to(device)
    src, target = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    net_output = model(src, src_lengths=lengths.to(device))
    lprobs = model.get_normalized_probs(net_output, log_probs=True, sample={"target": target})
    token_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    greedy = lprobs.argmax(-1) == target
    return token_lp.double().cpu(), greedy.cpu()


@torch.no_grad()
def continuation_logprobs(model, candidates: Sequence[Candidate], pad: int,
                          device="cpu") -> torch.Tensor:
    """Sum of log p(continuation token | previous tokens) for each candidate, in ONE forward
    padded to the longest candidate. Returns a float64 tensor of shape (len(candidates),)."""
    width = max(len(c.tokens) for c in candidates) - 1
    lp, _ = token_logprobs(model, [c.tokens for c in candidates], pad, width, device)
    return torch.tensor([lp[i, len(c.tokens) - 1 - c.n_cont:len(c.tokens) - 1].sum().item()
                         for i, c in enumerate(candidates)], dtype=torch.float64)


def length_bucket(n: int, cap: Optional[int] = None) -> int:
    """The padded width of a sequence of n inputs: the first of 8, 12, 16, 24, 32, 48, 64,
    96, 128, ... (powers of two and 1.5x them) >= n, at most ``cap`` (the model's window)."""
    width = 8
    while width < n:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return min(width, cap) if cap is not None and n <= cap else width


class Span(NamedTuple):
    """The score of a candidate's continuation."""

    logprob: float  # summed log-probability (float64 sum of the float32 token scores)
    greedy: bool  # every continuation token is the model's argmax
    token_logprobs: Optional[Tuple[float, ...]] = None  # per token, when asked for


class SpanScorer:
    """Continuation log-likelihoods that do not depend on batching.

    A forward's floats depend on its shape: the padded length changes how matmuls are
    blocked, so the same sequence scored in two batches could differ in the last digit,
    and two candidates with the same tokens (both names <unk> in a Winogrande pair) could
    break a tie differently at each --batch-size. So:

    - each distinct (tokens, n_cont) is scored once and its score shared: identical
      candidates get identical scores by construction, and ties follow the
      first-candidate rule at every batch size;
    - a sequence is padded to its own length bucket (length_bucket), never to its batch's
      longest, and only sequences of one bucket share a forward;
    - a forward has at least 2 rows (a lone row is repeated): on CPU a one-row forward
      takes other kernels (measured: sMLP scores moved by ~1e-6).

    Then dense and attention models score bitwise the same at every row count >= 2
    (tested at --batch-size 1, 8, 16). Token-routed experts (sMLP's tMoE, Switch, GShard,
    Base, HASH) multiply the rows routed to each expert, and how many those are depends
    on the other sequences of the forward: there a score can still move in the last
    float digit (measured on a tiny sMLP: 1 of 40 COPA candidates, by 1e-6), which cannot
    flip a prediction unless two different candidates score within that of each other.

    ``rows`` = sequences per forward: memory and speed.
    """

    def __init__(self, model, pad: int, device="cpu", rows: int = 16,
                 max_positions: Optional[int] = None, progress=None):
        self.model, self.pad, self.device = model, pad, device
        self.rows, self.max_positions, self.progress = max(rows, 2), max_positions, progress

    def __call__(self, candidates: Sequence[Candidate], keep_tokens: bool = False) -> List[Span]:
        keys = [(tuple(c.tokens), c.n_cont) for c in candidates]
        by_width: Dict[int, list] = defaultdict(list)
        for key in dict.fromkeys(keys):  # distinct, in order
            by_width[length_bucket(len(key[0]) - 1, self.max_positions)].append(key)
        spans = {}
        for width in sorted(by_width):
            for chunk in batches(by_width[width], self.rows):
                rows = chunk if len(chunk) > 1 else chunk * 2
                lp, greedy = token_logprobs(self.model, [k[0] for k in rows], self.pad, width, self.device)
                for i, (tokens, n_cont) in enumerate(chunk):
                    end = len(tokens) - 1  # targets [end - n_cont, end) are the continuation
                    scored = lp[i, end - n_cont:end]
                    spans[tokens, n_cont] = Span(scored.sum().item(), bool(greedy[i, end - n_cont:end].all()),
                                                 tuple(scored.tolist()) if keep_tokens else None)
                if self.progress is not None:
                    self.progress.update(len(chunk))
        return [spans[k] for k in keys]


def choose(scores: Sequence[float], n_tokens: Sequence[int], length_normalized: bool) -> int:
    """Index of the best candidate (the first one on ties)."""
    if length_normalized:
        scores = [s / n for s, n in zip(scores, n_tokens)]
    return max(range(len(scores)), key=lambda i: scores[i])


# ----------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


@dataclass
class ChoiceScore:
    """One candidate's score and the lengths any normalisation needs."""

    logprob: float  # summed over the scored continuation tokens
    tokens: int  # continuation tokens scored
    chars: int  # characters of the continuation text (as in the task file, leading space included)
    bytes: int  # UTF-8 bytes of the same text
    truncated: bool
    unk: int  # scored tokens that are <unk>

    def to_json(self) -> dict:
        return {"logprob": self.logprob, "tokens": self.tokens, "chars": self.chars,
                "bytes": self.bytes, "truncated": self.truncated, "unk": self.unk}


# rule -> score whose argmax is the prediction (lm-evaluation-harness names where it has them)
RULES: Dict[str, Callable[[ChoiceScore], float]] = {
    "acc": lambda c: c.logprob,
    "acc_norm": lambda c: c.logprob / c.chars,
    "acc_bytes": lambda c: c.logprob / c.bytes,
    "acc_per_token": lambda c: c.logprob / c.tokens,
}


def argmax_first(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def gold_indices(example: Example) -> List[int]:
    """Candidates counted correct: the label, or for ReCoRD every entity that matches a gold
    answer exactly (SQuAD normalisation), so that accuracy = exact match."""
    if example.answers:
        return [i for i, e in enumerate(example.choices) if any(exact_match(e, a) for a in example.answers)]
    return [example.label] if example.label >= 0 else []


# ----------------------------------------------------------------------------- a task


@dataclass
class TaskResult:
    task: str
    scoring: str
    examples: int
    truncated: int  # examples with at least one candidate cut on the left
    accuracy: float  # by the task's published convention: `metric`
    seconds: float
    exact_match: Optional[float] = None  # ReCoRD only
    f1: Optional[float] = None  # ReCoRD only
    predictions: List[int] = field(default_factory=list, repr=False)  # by `metric`
    metric: str = "acc"  # the rule `accuracy` uses: acc or acc_per_token
    rule_accuracy: Dict[str, float] = field(default_factory=dict)  # acc, acc_norm, acc_bytes[, acc_per_token]
    rule_predictions: Dict[str, List[int]] = field(default_factory=dict, repr=False)
    choice_scores: List[List[ChoiceScore]] = field(default_factory=list, repr=False)
    gold: List[List[int]] = field(default_factory=list, repr=False)
    lines: List[int] = field(default_factory=list, repr=False)
    unk_rate: float = 0.0  # share of scored tokens that are <unk>

    def to_json(self) -> dict:
        out = {
            "accuracy": self.accuracy,
            "metric": self.metric,
            **self.rule_accuracy,
            "examples": self.examples,
            "truncated": self.truncated,
            "unk_rate": round(self.unk_rate, 6),
            "scoring": self.scoring,
            "seconds": round(self.seconds, 3),
            "seconds_per_1000_examples": round(1000 * self.seconds / max(self.examples, 1), 3),
        }
        if self.exact_match is not None:
            out.update(exact_match=self.exact_match, f1=self.f1)
        return out

    def prediction_records(self):
        """One dict per example for the --predictions file (no task text: only indices,
        scores and lengths, from which any normalisation can be recomputed)."""
        for i, scores in enumerate(self.choice_scores):
            yield {
                "task": self.task, "index": i, "line": self.lines[i],
                "gold": self.gold[i][0] if len(self.gold[i]) == 1 else self.gold[i],
                "prediction": self.predictions[i], "metric": self.metric,
                "correct": self.predictions[i] in self.gold[i],
                "predictions": {rule: preds[i] for rule, preds in self.rule_predictions.items()},
                "choices": [c.to_json() for c in scores],
            }


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def encode_examples(examples: Sequence[Example], build: CandidateBuilder, path=None) -> List[List[Candidate]]:
    """Every example's candidates, encoded; a candidate with nothing to score is an error
    naming the file and line."""
    encoded = []
    for n, ex in enumerate(examples):
        try:
            encoded.append(build(ex))
        except ValueError as e:
            where = (path or "<examples>", ex.lineno or n + 1)
            raise TaskFileError(*where, f"{e} (continuations {ex.continuations!r})") from None
    return encoded


def score_choices(examples: Sequence[Example], encoded: Sequence[List[Candidate]], spans: Sequence[Span],
                  unk: int) -> List[List[ChoiceScore]]:
    """Per example, per candidate: ChoiceScore from the flat list of spans."""
    out, k = [], 0
    for ex, cands in zip(examples, encoded):
        row = []
        for text, c in zip(ex.continuations, cands):
            row.append(ChoiceScore(spans[k].logprob, c.n_cont, len(text), len(text.encode("utf-8")),
                                   c.truncated, sum(t == unk for t in c.tokens[len(c.tokens) - c.n_cont:])))
            k += 1
        out.append(row)
    return out


def evaluate_task(model, spec: TaskSpec, examples: Sequence[Example], build: CandidateBuilder,
                  pad: int, batch_size: int = 8, device="cpu", show_progress: bool = True,
                  encoded: Optional[List[List[Candidate]]] = None, unk: Optional[int] = None) -> TaskResult:
    """Score every example of one task and compute its metrics under every rule.

    ``batch_size`` examples' worth of candidates go through the model per forward (on
    average); the scores do not depend on it (SpanScorer).
    """
    from tqdm import tqdm

    model.eval()  # dropout off; MoE routers use their evaluation routing
    if encoded is None:
        encoded = encode_examples(examples, build)
    flat = [c for cands in encoded for c in cands]
    per_example = len(flat) / max(len(examples), 1)
    start = time.perf_counter()
    with tqdm(total=len(set((tuple(c.tokens), c.n_cont) for c in flat)), desc=spec.name,
              disable=not show_progress) as bar:
        scorer = SpanScorer(model, pad, device, round(batch_size * per_example), build.max_positions, bar)
        spans = scorer(flat)
    seconds = time.perf_counter() - start

    scores = score_choices(examples, encoded, spans, unk if unk is not None else -1)
    rules = ["acc", "acc_norm", "acc_bytes"] + (["acc_per_token"] if spec.length_normalized else [])
    metric = "acc_per_token" if spec.length_normalized else "acc"
    gold = [gold_indices(ex) for ex in examples]
    n = max(len(examples), 1)
    rule_predictions = {r: [argmax_first([RULES[r](c) for c in row]) for row in scores] for r in rules}
    rule_accuracy = {r: sum(p in g for p, g in zip(preds, gold)) / n for r, preds in rule_predictions.items()}
    scored = sum(c.tokens for row in scores for c in row)
    result = TaskResult(
        spec.name, spec.scoring, len(examples), sum(any(c.truncated for c in cands) for cands in encoded),
        rule_accuracy[metric], seconds, predictions=rule_predictions[metric], metric=metric,
        rule_accuracy=rule_accuracy, rule_predictions=rule_predictions, choice_scores=scores, gold=gold,
        lines=[ex.lineno for ex in examples],
        unk_rate=sum(c.unk for row in scores for c in row) / max(scored, 1))
    if spec.name == "record":
        # accuracy = exact match (SQuAD normalisation) of the chosen entity with any gold answer
        chosen = [ex.choices[p] for ex, p in zip(examples, result.predictions)]
        result.exact_match = sum(max((exact_match(c, a) for a in ex.answers), default=0.0)
                                 for c, ex in zip(chosen, examples)) / n
        result.f1 = sum(max((token_f1(c, a) for a in ex.answers), default=0.0)
                        for c, ex in zip(chosen, examples)) / n
    return result
