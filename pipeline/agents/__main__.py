"""`python -m pipeline.agents train ENV` / `publish ENV`: see pipeline.agents.cli."""

import sys

from pipeline.agents.cli import main

sys.exit(main())
