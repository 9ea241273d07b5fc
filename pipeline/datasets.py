"""`python -m pipeline.datasets`: the command for the dataset CLI; the code lives in `pipeline.data.cli`."""

import sys

from pipeline.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
