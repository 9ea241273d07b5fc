"""`python -m pipeline.export`: the bundle export; the code lives in `pipeline.registry.export`."""

import sys

from pipeline.registry.export import main

if __name__ == "__main__":
    sys.exit(main())
