"""Entry point kept at the repository root so `python3 pipeline.py ...` works from a checkout; the same
CLI is installed as the `fast-sae` command. Everything lives in the `fast_sae` package."""
from fast_sae.cli import cli

if __name__ == "__main__":
    cli()
