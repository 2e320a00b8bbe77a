"""What every benchmark records with its figures, and how it writes them (OUT.json + OUT.md)."""
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from fairseq_smlp.atomic_write import atomic_write_text


def run_metadata(script: str, argv=None, device: str = "cpu") -> dict:
    """The command that produced the figures (`python -m benchmarks.SCRIPT ARGS`; SCRIPT with or
    without .py), and the machine (or GPU) it ran on."""
    args = argv if argv is not None else sys.argv[1:]
    module = script[:-3] if script.endswith(".py") else script
    return {
        "command": " ".join([f"python -m benchmarks.{module}", *map(shlex.quote, args)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
    }


def write_results(out, result: dict, write_markdown) -> None:
    """OUT.json (everything) and OUT.md (the table, by write_markdown(path, result))."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), result)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown_header(title: str, meta: dict, details: str) -> list:
    """The lines every results page opens with: title, command, machine (then `details`)."""
    return [
        f"# {title}", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), load average "
        f"{meta['load_average']} at the start. {details}", "",
    ]
