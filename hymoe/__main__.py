import sys

from hymoe.cli import main

sys.exit(main())
