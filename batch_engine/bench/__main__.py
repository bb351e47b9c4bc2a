"""`python -m batch_engine.bench <name>`: run one benchmark (see `batch_engine.bench.engine`)."""

import sys

from batch_engine.bench.engine import main

sys.exit(main())
