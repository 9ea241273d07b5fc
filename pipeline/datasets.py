"""`python -m pipeline.datasets`: the command for the dataset CLI; the code lives in `pipeline.data.sources`."""

import sys

from pipeline.data.sources import main

if __name__ == "__main__":
    sys.exit(main())
