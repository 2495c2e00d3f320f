"""`python -m mlx_cai`: the same as the `mlx-cai` command."""

from mlx_cai.cli import main

main()
