"""Score multiple-choice examples by language-model log-likelihood.

For each candidate, the model reads ``eos + context + continuation`` and we sum the
log-probabilities of the continuation tokens; the candidate with the highest score (or
highest mean score per token, for length-normalised tasks) is the prediction.

The model is any fairseq language model: ``model(src_tokens, src_lengths=...)`` returns
``net_output`` and ``model.get_normalized_probs(net_output, log_probs=True)`` gives
log-probabilities of shape (batch, time, vocab).
"""
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .zeroshot_tasks import Example, TaskSpec

# ----------------------------------------------------------------------------- text -> ids


def light_tokenize(text: str) -> List[str]:
    """Words and single punctuation marks: "It's done." -> ["It", "'", "s", "done", "."]."""
    return re.findall(r"\w+|[^\w\s]", text)


class TextEncoder:
    """Text -> token ids of a fairseq dictionary (no eos appended).

    With a sentencepiece model the text is cut into pieces first (the way the training
    data was preprocessed); otherwise it is split into words and punctuation.
    Unknown tokens map to the dictionary's <unk>.
    """

    def __init__(self, dictionary, spm_model: Optional[str] = None):
        self.dictionary = dictionary
        self.sp = None
        if spm_model is not None:
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))

    def tokens(self, text: str) -> List[str]:
        if self.sp is not None:
            return self.sp.encode(text, out_type=str)
        return light_tokenize(text)

    def __call__(self, text: str) -> List[int]:
        return [self.dictionary.index(t) for t in self.tokens(text)]


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
def continuation_logprobs(model, candidates: Sequence[Candidate], pad: int,
                          device="cpu") -> torch.Tensor:
    """Sum of log p(continuation token | previous tokens) for each candidate, in ONE forward.

    Sequences are padded on the RIGHT: sMLP's spatial gating mixes tokens by absolute
    position, so left padding would shift every position and change the scores.
    Returns a float64 tensor of shape (len(candidates),).
    """
    lengths = torch.tensor([len(c.tokens) - 1 for c in candidates])  # input lengths
    tokens = torch.full((len(candidates), int(lengths.max()) + 1), pad, dtype=torch.long)
    for i, c in enumerate(candidates):
        tokens[i, :len(c.tokens)] = torch.tensor(c.tokens)
    tokens = tokens.to(device)
    src, target = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    net_output = model(src, src_lengths=lengths.to(device))
    lprobs = model.get_normalized_probs(net_output, log_probs=True, sample={"target": target})
    token_lp = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).double()  # (B, T)

    # Scored positions: the last n_cont targets before each sequence's padding.
    pos = torch.arange(target.size(1), device=device)[None, :]  # (1, T)
    end = lengths.to(device)[:, None]
    start = end - torch.tensor([c.n_cont for c in candidates], device=device)[:, None]
    scored = (pos >= start) & (pos < end)
    return torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(-1).cpu()


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


# ----------------------------------------------------------------------------- a task


@dataclass
class TaskResult:
    task: str
    scoring: str
    examples: int
    truncated: int  # examples with at least one candidate cut on the left
    accuracy: float
    seconds: float
    exact_match: Optional[float] = None  # ReCoRD only
    f1: Optional[float] = None  # ReCoRD only
    predictions: List[int] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        out = {
            "accuracy": self.accuracy,
            "examples": self.examples,
            "truncated": self.truncated,
            "scoring": self.scoring,
            "seconds": round(self.seconds, 3),
            "seconds_per_1000_examples": round(1000 * self.seconds / max(self.examples, 1), 3),
        }
        if self.exact_match is not None:
            out.update(exact_match=self.exact_match, f1=self.f1)
        return out


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def text_length(example: Example) -> int:
    return max(len(c) + len(x) for c, x in zip(example.contexts, example.continuations))


def predict(model, examples: Sequence[Example], build: CandidateBuilder, pad: int,
            length_normalized: bool, batch_size: int = 8, device="cpu", progress=None):
    """Predicted candidate index per example, and the number of truncated examples.

    All candidates of ``batch_size`` examples go through the model in one forward.
    Examples of similar length are batched together (less padding); scores do not
    depend on the batch, so this changes nothing but speed.
    """
    order = sorted(range(len(examples)), key=lambda i: text_length(examples[i]))
    predictions, truncated = [None] * len(examples), 0
    for group in batches(order, batch_size):
        encoded = [build(examples[i]) for i in group]
        flat = [c for cands in encoded for c in cands]
        scores = continuation_logprobs(model, flat, pad, device).tolist()
        for i, cands in zip(group, encoded):
            mine, scores = scores[:len(cands)], scores[len(cands):]
            predictions[i] = choose(mine, [c.n_cont for c in cands], length_normalized)
            truncated += any(c.truncated for c in cands)
        if progress is not None:
            progress.update(len(group))
    return predictions, truncated


def evaluate_task(model, spec: TaskSpec, examples: Sequence[Example], build: CandidateBuilder,
                  pad: int, batch_size: int = 8, device="cpu",
                  show_progress: bool = True) -> TaskResult:
    """Score every example of one task and compute its metrics."""
    from tqdm import tqdm

    model.eval()  # dropout off; MoE routers use their evaluation routing
    start = time.perf_counter()
    with tqdm(total=len(examples), desc=spec.name, disable=not show_progress) as bar:
        predictions, truncated = predict(model, examples, build, pad, spec.length_normalized,
                                         batch_size, device, bar)
    seconds = time.perf_counter() - start

    n = max(len(examples), 1)
    result = TaskResult(spec.name, spec.scoring, len(examples), truncated, 0.0, seconds,
                        predictions=predictions)
    if spec.name == "record":
        # accuracy = exact match (SQuAD normalisation) of the chosen entity with any gold answer
        chosen = [ex.choices[p] for ex, p in zip(examples, predictions)]
        result.exact_match = sum(max((exact_match(c, a) for a in ex.answers), default=0.0)
                                 for c, ex in zip(chosen, examples)) / n
        result.f1 = sum(max((token_f1(c, a) for a in ex.answers), default=0.0)
                        for c, ex in zip(chosen, examples)) / n
        result.accuracy = result.exact_match
    else:
        result.accuracy = sum(p == ex.label for p, ex in zip(predictions, examples)) / n
    return result
