import sys

from medops.cli import main

sys.exit(main())
