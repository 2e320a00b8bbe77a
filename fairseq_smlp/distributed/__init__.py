"""Expert parallelism on fairseq's own distributed training: `parallelize_experts`, which
distributes a built model's experts over the workers, and the all-to-all exchange that moves
routed rows between them (expert_parallel.py); a CPU launcher (launch_cpu.py).
Rank checkpoint files: fairseq_smlp/checkpoints/rank_files.py."""
