"""`python -m sae_torch ...`: the `sae` command with the torch backend as default."""
import os
import sys

from sae_core.cli import main

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # hook: started by torchrun with several processes
        from sae_torch.distributed import main as distributed_main  # distributed training (sae_torch.distributed)

        sys.exit(distributed_main())
    sys.exit(main(default_backend="torch"))
