"""`python -m llm_batch_dev.benchmark [options]` (`make bench`)."""

import sys

from llm_batch_dev.benchmark.run import main

sys.exit(main())
