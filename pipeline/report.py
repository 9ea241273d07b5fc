"""`python -m pipeline.report`: the quality report; the code lives in `pipeline.quality.report`."""

import sys

from pipeline.quality.report import main

if __name__ == "__main__":
    sys.exit(main())
