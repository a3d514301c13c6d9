import sys

from sftlens.cli import main

sys.exit(main())
