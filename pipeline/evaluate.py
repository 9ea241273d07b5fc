"""`python -m pipeline.evaluate`: the command for evaluation; the code lives in `pipeline.quality.evaluate`."""

import sys

from pipeline.quality.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
