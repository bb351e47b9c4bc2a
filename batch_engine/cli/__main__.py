"""`python -m batch_engine.cli ...`, the same as `batch-engine ...`."""

import sys

from batch_engine.cli.main import main

sys.exit(main())
