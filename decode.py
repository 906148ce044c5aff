"""`python decode.py --help`: the same tool as the console script (code in vadusa/cli/decode.py)."""

import sys

from vadusa.cli.decode import main

if __name__ == "__main__":
    sys.exit(main())
