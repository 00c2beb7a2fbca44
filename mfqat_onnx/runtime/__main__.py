"""Entry point of ``python -m mfqat_onnx.runtime``."""

from mfqat_onnx.runtime._cli import main

raise SystemExit(main())
