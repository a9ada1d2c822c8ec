"""The console script's entry point (``defbench``): the command group of ``benchmark/commands``."""
from .commands import main

if __name__ == "__main__":  # pragma: no cover
    main()
