#!/usr/bin/env bash
# Runs tests/test_kernels.py against the oldest onnxruntime the kernel library
# supports (1.17, whose C API version 17 the library is built against), each
# version in its own virtual environment under .mfqat_cache/.
#
#   custom_ops/test_oldest_ort.sh                          # onnxruntime 1.17.0
#   ORT_VERSIONS="1.17.0 1.17.3" custom_ops/test_oldest_ort.sh
#
# onnxruntime 1.17 wheels are built against NumPy 1.x, so these environments
# pin numpy<2. The repository is put on PYTHONPATH instead of being installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
ORT_VERSIONS="${ORT_VERSIONS:-1.17.0}"
status=0
for version in $ORT_VERSIONS; do
  venv=".mfqat_cache/venv-ort-${version}"
  if [ ! -x "${venv}/bin/python" ]; then
    "${PYTHON}" -m venv "${venv}"
  fi
  "${venv}/bin/python" -m pip install --quiet --disable-pip-version-check \
    "onnxruntime==${version}" "numpy>=1.26,<2" "onnx>=1.17" "pytest>=8" "tqdm>=4.60"
  echo "== tests/test_kernels.py with onnxruntime $("${venv}/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')"
  if ! PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}" "${venv}/bin/python" -m pytest tests/test_kernels.py -q \
      -p no:cacheprovider; then
    echo "== FAILED with onnxruntime ${version}"
    status=1
  fi
done
exit "${status}"
