"""`python -m pipeline.simulate`: the command for simulation; the code lives in `pipeline.sim.simulate`."""

import sys

from pipeline.sim.simulate import main

if __name__ == "__main__":
    sys.exit(main())
