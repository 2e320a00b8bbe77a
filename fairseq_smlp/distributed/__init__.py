"""Expert parallelism on fairseq's own distributed training: the all-to-all exchange,
checkpoints that keep every rank's experts, and a CPU launcher (launch_cpu)."""
