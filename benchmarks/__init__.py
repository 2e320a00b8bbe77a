"""Speed and quality benchmarks, each a module run from the repository root as
`python -m benchmarks.NAME` (see benchmarks/README.md); results/ holds what they wrote."""
