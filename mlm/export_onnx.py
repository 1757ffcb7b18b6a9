"""`python -m mlm.export_onnx MODEL_DIR OUT.onnx`, the command the README names; the code is in
mlm.inference.export_onnx."""

import sys

from mlm.inference.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
