#!/bin/sh
# Re-resolves deploy/requirements-gpu.lock: the project's dependencies and its gpu extra, pinned with
# hashes, for the image's Python (3.11, manylinux x86_64). Needs uv (`pip install uv`) and PyPI.
#   sh deploy/lock.sh
# The torch stack (torch, torchvision, triton and the CUDA wheels they pull) stays out of the lock:
# PyPI's torch is a CUDA 13 build, while deploy/Dockerfile and cluster-vm.yaml install a CUDA 12 build
# from PyTorch's own index first (see the Dockerfile for why).
set -eu
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra gpu --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --custom-compile-command "sh deploy/lock.sh" \
    --no-emit-package torch --no-emit-package torchvision --no-emit-package triton \
    --no-emit-package cuda-toolkit --no-emit-package cuda-bindings --no-emit-package cuda-pathfinder \
    --no-emit-package nvidia-cublas --no-emit-package nvidia-cuda-cupti --no-emit-package nvidia-cuda-nvrtc \
    --no-emit-package nvidia-cuda-runtime --no-emit-package nvidia-cudnn-cu13 --no-emit-package nvidia-cufft \
    --no-emit-package nvidia-cufile --no-emit-package nvidia-curand --no-emit-package nvidia-cusolver \
    --no-emit-package nvidia-cusparse --no-emit-package nvidia-cusparselt-cu13 --no-emit-package nvidia-nccl-cu13 \
    --no-emit-package nvidia-nvjitlink --no-emit-package nvidia-nvshmem-cu13 --no-emit-package nvidia-nvtx \
    -o deploy/requirements-gpu.lock
# A new torch may pull CUDA wheels of other names: they belong to the torch stack, not to the lock.
if grep -E '^(nvidia|cuda)-' deploy/requirements-gpu.lock; then
    echo "deploy/lock.sh: add the CUDA wheels above to the --no-emit-package list" >&2
    exit 1
fi
