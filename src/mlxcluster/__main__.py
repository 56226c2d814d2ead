"""``python -m mlxcluster``."""

from mlxcluster.cli import main

main()
