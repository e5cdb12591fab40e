"""`python -m sae_torch ...`: the `sae` command with the torch backend as default."""
import sys

from sae_core.cli import main

if __name__ == "__main__":
    sys.exit(main(default_backend="torch"))
