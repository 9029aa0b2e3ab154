"""`python3 -m fast_sae ...` is the same CLI as `pipeline.py` and `fast-sae`."""
from fast_sae.cli import cli

cli()
