"""`python -m xpu_coopt.cli`: the xpu-coopt command, where its script is not on the PATH."""

import sys

from xpu_coopt.cli import main

sys.exit(main())
