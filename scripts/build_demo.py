"""`python scripts/build_demo.py --help`: the same tool as the console script (code in vadusa/cli/build_demo.py)."""

import sys

from vadusa.cli.build_demo import main

if __name__ == "__main__":
    sys.exit(main())
