"""PAR's benchmarks: `venv_build.py` (venvs alone) and the end-to-end set run by `scripts/bench`."""
