"""`python -m mlm.app --model RUN_DIR`: the command the README names; the code is mlm.inference.app."""

import sys

from mlm.inference.app import main

if __name__ == "__main__":
    sys.exit(main())
