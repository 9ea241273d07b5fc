"""`python -m pipeline.train`: training without Ray; the code lives in `pipeline.training.cli`."""

import sys

from pipeline.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
