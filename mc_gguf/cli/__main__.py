import sys

from mc_gguf.cli import main

sys.exit(main())
