"""lm-evaluation-harness adapter: any fairseq LM checkpoint as the harness model ``fairseq_smlp``.

    python -m fairseq_smlp.eval.harness --model fairseq_smlp \\
        --model_args path=checkpoints/checkpoint_best.pt,normalize=auto \\
        --include_path $(python -m fairseq_smlp.eval.harness --task-dir) \\
        --tasks smlp_copa,smlp_piqa --batch_size 8 --device cpu

(also installed as ``fairseq-smlp-lm-eval``). lm-eval 0.4.13 finds models only in its
own registry and reads no entry points, so plain ``lm_eval --model fairseq_smlp`` cannot
see an external model: this command registers the model, then runs the harness's own
command line with the same arguments. From Python, ``import fairseq_smlp.eval.harness``
registers it for ``lm_eval.simple_evaluate(model="fairseq_smlp", ...)``.

Scoring is the zero-shot scorer's (scoring.py): the same text -> tokens, the same left
truncation and routing prefix of partial-prediction models (make_candidate), and
batch-independent scores, so the harness's acc / acc_norm equal fairseq-smlp-zeroshot's,
prediction for prediction. Model args: path, dict, spm_model, normalize (auto/none/ptb),
user_dir, max_length (window of loglikelihood_rolling; default the model's), and the
harness's batch_size and device.
"""
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..errors import UserError, exit_with
from .scoring import Candidate, SpanScorer, make_candidate
from .text import TextEncoder

MODEL_NAME = "fairseq_smlp"
TASK_DIR = Path(__file__).resolve().parent / "harness_tasks"  # YAML task configs for --include_path

try:
    from lm_eval.api.model import LM
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("the harness adapter needs lm-evaluation-harness: pip install -e '.[harness]'") from e


def rolling_candidates(tokens: List[int], eos: int, window: int, prefix: int = 0) -> List[Candidate]:
    """Cut a token stream into windows that score every token exactly once.

    The stream is read as ``eos + tokens``. Causal models (prefix 0): window k reads
    ``window`` inputs and predicts the next ``window`` tokens, the first one from the
    token before the window (eos for the first): fairseq-eval-lm's blocks of
    --tokens-per-sample tokens. A partial-prediction model with routing prefix P must
    see P tokens before every scored one, so its windows predict window - P tokens each,
    after P tokens of context (eos-filled at the start).
    """
    if window <= prefix:
        raise ValueError(f"window {window} leaves no position to score after the routing prefix {prefix}")
    stream, step, out = [eos] + list(tokens), window - prefix, []
    for start in range(0, len(tokens), step):  # targets stream[start + 1 : end + 1]
        end = min(start + step, len(tokens))
        fill = max(0, prefix - start)
        out.append(Candidate([eos] * fill + stream[max(0, start - prefix):end + 1], end - start, False))
    return out


class FairseqLM(LM):
    """A fairseq language-model checkpoint as an lm-evaluation-harness model."""

    def __init__(self, path: str, dict: Optional[str] = None, spm_model: Optional[str] = None,
                 normalize: str = "auto", user_dir: Optional[str] = None, batch_size=8,
                 max_batch_size=None, device: Optional[str] = None, max_length: Optional[int] = None,
                 bf16=False, **unused):
        super().__init__()
        from .zeroshot import PACKAGE_DIR, load_model, max_positions_of

        model, dictionary, _ = load_model(str(path), dict, user_dir or str(PACKAGE_DIR))
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self._device).eval()
        self.dictionary = dictionary
        self.encoder = TextEncoder(dictionary, spm_model, normalize)
        self.max_positions = max_positions_of(model)
        self.prefix = int(getattr(getattr(model, "decoder", None), "score_from", 0) or 0)
        self.window = int(max_length or self.max_positions or 0)
        if self.window <= 0:
            raise ValueError("the model has no window size: pass max_length=N in --model_args")
        self.rows = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": a fixed 8; scores do not depend on it
        self.bf16 = str(bf16).lower() in ("1", "true", "yes")  # --model_args bf16=true: bf16 autocast

    @property
    def device(self):
        return self._device

    def scorer(self):
        """Scores spans; under bf16 autocast with --model_args bf16=true (fp32 weights)."""
        score = SpanScorer(self.model, self.dictionary.pad(), self._device, self.rows, self.max_positions)

        def run(*args, **kwargs):
            with torch.autocast(device_type=torch.device(self._device).type, dtype=torch.bfloat16, enabled=self.bf16):
                return score(*args, **kwargs)

        return run

    def pair_candidate(self, context: str, continuation: str) -> Candidate:
        """(context, continuation) as the zero-shot scorer joins them. Whitespace at the end
        of the context moves to the continuation (as the harness's own models do), so a
        subword encoder does not see a dangling space."""
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        return make_candidate(self.encoder(context), self.encoder(continuation), self.dictionary.eos(),
                              self.max_positions, self.prefix)

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        candidates = [self.pair_candidate(*req.args) for req in requests]
        return [(span.logprob, span.greedy) for span in self.scorer()(candidates)]

    def rolling_token_logprobs(self, text: str) -> List[Tuple[float, ...]]:
        """Per window of rolling_candidates, the log-probability of each scored token. Each
        line of the text is one fairseq line (its tokens, then eos), as fairseq-preprocess
        binarizes a text file, so the windows are fairseq-eval-lm's blocks."""
        tokens = self.encoder.lines(text, self.dictionary.eos())
        windows = rolling_candidates(tokens, self.dictionary.eos(), self.window, self.prefix)
        return [span.token_logprobs for span in self.scorer()(windows, keep_tokens=True)]

    def loglikelihood_rolling(self, requests) -> List[float]:
        return [sum(sum(w) for w in self.rolling_token_logprobs(req.args[0])) for req in requests]

    def generate_until(self, requests):
        raise NotImplementedError("fairseq_smlp scores text (loglikelihood, loglikelihood_rolling); "
                                  "it does not generate: use fairseq-interactive for generation")


def register():
    """Register FairseqLM with the harness as ``fairseq_smlp`` (idempotent)."""
    import lm_eval.models  # noqa: F401  (the built-in models first: the registry imports them only when empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=FairseqLM)


register()


def cli_main(argv=None):
    """The harness's command line with the fairseq_smlp model registered."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--task-dir"]:
        print(TASK_DIR)
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except UserError as e:  # a refused or corrupt checkpoint, a bad --dict: one line
        exit_with(e, "fairseq-smlp-lm-eval")


if __name__ == "__main__":
    cli_main()
