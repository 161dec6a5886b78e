"""``python -m hdebm_ray``: the same command line as ``hdebm-ray``."""

import sys

from .cli.main import main

sys.exit(main())
