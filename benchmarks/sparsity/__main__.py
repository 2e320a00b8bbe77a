"""python -m benchmarks.sparsity train|render|list (benchmarks/sparsity/cli.py)."""
from benchmarks.sparsity.cli import main

main()
