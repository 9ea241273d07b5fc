"""`python -m pipeline.pretrain_all`: the Ray job; the code lives in `pipeline.job.pretrain_all`."""

import sys

from pipeline.job.pretrain_all import main

if __name__ == "__main__":
    sys.exit(main())
