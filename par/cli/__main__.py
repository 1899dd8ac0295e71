"""`python3 -m par.cli`: parctl from a source tree (the tests run it so)."""

from par.cli import main

main()
