"""Search for better training options (Optuna): python scripts/tune.py --help"""

import sys

from mnist_cnn.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
