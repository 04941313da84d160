"""`python -m nodes` runs the fedstream command line."""

from nodes.cli import main

main()
