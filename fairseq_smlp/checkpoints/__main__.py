"""python -m fairseq_smlp.checkpoints reshard CKPT... --to-world-size N --out OUT.pt"""
from .reshard import main

main()
