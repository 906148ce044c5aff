"""`python train_heads.py --help`: the same tool as the console script (code in vadusa/cli/train_heads.py)."""

import sys

from vadusa.cli.train_heads import main

if __name__ == "__main__":
    sys.exit(main())
