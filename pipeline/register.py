"""`python -m pipeline.register`: register later, promote; the code lives in `pipeline.registry.register`."""

import sys

from pipeline.registry.register import main

if __name__ == "__main__":
    sys.exit(main())
