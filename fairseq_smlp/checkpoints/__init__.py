"""Checkpoints: files that survive a crash, one file per rank with sharded experts, resharding.

    file_safety.py  atomic copies; a truncated or corrupt file named in the error
    rank_files.py   the layout of expert-parallel checkpoints (checkpoint_X-rank-R.pt)
    reshard.py      move a checkpoint between world sizes:
                    python -m fairseq_smlp.checkpoints reshard CKPT --to-world-size N --out OUT.pt
fairseq's own checkpoint code is changed only in fairseq_patches.py, which calls these.
"""
