"""Expert parallelism on fairseq's own distributed training: the all-to-all exchange that moves
routed rows between workers (expert_parallel.py) and a CPU launcher (launch_cpu.py).
Rank checkpoint files: fairseq_smlp/checkpoints/rank_files.py."""
