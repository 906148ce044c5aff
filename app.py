"""`python app.py --help`: the same tool as the console script (code in vadusa/cli/app.py)."""

import sys

from vadusa.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
