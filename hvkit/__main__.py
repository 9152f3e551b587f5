import sys

from hvkit.cli import main

sys.exit(main())
