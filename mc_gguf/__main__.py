"""`python -m mc_gguf`: the mc-gguf command."""

import sys

from mc_gguf.cli import main

sys.exit(main())
