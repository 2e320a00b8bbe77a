"""README's quickstart output, written from the committed quickstart results (never by hand).

    fairseq-smlp-quickstart --precision bf16 --out-dir runs/qs_bf16   # then copy its results.json
    fairseq-smlp-quickstart --precision fp32 --out-dir runs/qs_fp32   #   to benchmarks/results/quickstart_{bf16,fp32}.json
    python -m benchmarks.readme_quickstart                            # fills README's quickstart block

tests/integration/test_quickstart.py fails when README's block differs from what this writes.
"""
import json
import re
from pathlib import Path

from fairseq_smlp.atomic_write import atomic_write_text
from fairseq_smlp.quickstart import summary

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def results(precision: str) -> dict:
    return json.loads((RESULTS / f"quickstart_{precision}.json").read_text())


def block() -> str:
    """The README lines between the quickstart markers."""
    bf16, fp32 = results("bf16"), results("fp32")
    return "\n".join([
        "```",
        "$ fairseq-smlp-quickstart",
        summary(bf16),
        "```",
        "",
        f"Measured {bf16['date']}, commit {bf16['commit']}, on {bf16['machine']} (`auto` picked bf16; "
        f"[results](benchmarks/results/quickstart_bf16.json)). With `--precision fp32` ({fp32['date']}, commit "
        f"{fp32['commit']}; [results](benchmarks/results/quickstart_fp32.json)): validation perplexity "
        f"{fp32['valid_ppl']:.2f}, test {fp32['test_ppl']:.2f}, {fp32['train_minutes']:.1f} min. A fixed number of "
        f"updates gives the same perplexity on a slow or busy machine; the minutes are not (these two ran side by "
        f"side, one thread each, beside other jobs).",
    ])


def readme_block(readme: str) -> str:
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n?" + re.escape(END), readme, re.S)
    return match.group(1) if match else ""


def main() -> None:
    path = REPO / "README.md"
    readme = path.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    atomic_write_text(path, readme[:start] + "\n" + block() + "\n" + readme[end:])


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="python -m benchmarks.readme_quickstart", description=__doc__.split("\n\n")[0],
                            epilog="Writes README.md's quickstart block from benchmarks/results/quickstart_{bf16,fp32}.json.").parse_args()
    main()
