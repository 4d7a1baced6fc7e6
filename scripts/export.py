"""Export a saved CNN for serving: python scripts/export.py MODEL.keras DIR"""

import sys

from mnist_cnn.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
