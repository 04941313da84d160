"""`python -m fedstream.nodes` runs the fedstream command line."""

from fedstream.nodes.cli import main

main()
