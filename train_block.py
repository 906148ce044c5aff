"""`python train_block.py --help`: the same tool as the console script (code in vadusa/cli/train_block.py)."""

import sys

from vadusa.cli.train_block import main

if __name__ == "__main__":
    sys.exit(main())
