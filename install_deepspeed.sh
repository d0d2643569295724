#!/usr/bin/env bash
# Installs DeepSpeed (https://www.deepspeed.ai) for the training tools' --deepspeed flag.
#
#   ./install_deepspeed.sh                 # into the Python on PATH
#   PYTHON=/path/to/python ./install_deepspeed.sh
#   DS_BUILD_OPS=1 ./install_deepspeed.sh  # compile the CUDA ops now instead of on first use (needs nvcc)
#
# DeepSpeed builds against the PyTorch that is already installed, so install PyTorch first. Extra arguments
# are passed to pip (e.g. a version pin: ./install_deepspeed.sh "deepspeed==0.16.*").
set -euo pipefail

PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "install_deepspeed.sh: PyTorch is not installed for $PYTHON; install it first (https://pytorch.org)" >&2
    exit 1
fi

# without build isolation DeepSpeed's setup sees the installed torch instead of downloading another one
"$PYTHON" -m pip install ninja
if [ "$#" -gt 0 ]; then
    "$PYTHON" -m pip install --no-build-isolation "$@"
else
    "$PYTHON" -m pip install --no-build-isolation "deepspeed>=0.14"
fi

"$PYTHON" -c "import deepspeed; print('DeepSpeed', deepspeed.__version__, 'is installed')"
echo "Train with it, e.g.: torchrun --nproc_per_node 2 -m dalle_pytorch.cli.train_dalle --deepspeed --zero_stage 2 ..."
