"""`python -m tunesmith ...`, the same as the `tunesmith` command; for several processes:
`torchrun --nproc-per-node 4 -m tunesmith train config.yaml`."""
from tunesmith.cli import main

main()
