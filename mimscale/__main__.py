import sys

from mimscale.cli import main

sys.exit(main())
