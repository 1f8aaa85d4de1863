#!/usr/bin/env bash
# Every GPU check in one go, on a machine with one CUDA GPU (numbers in the README's Performance section):
#   bash benchmarks/gpu_check.sh <folder with the extracted CIFAR-10 JPEGs (train/, test/)>
set -euo pipefail
data=${1:?usage: bash benchmarks/gpu_check.sh <cifar10 imagefolder root>}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
echo "== trainer step vs plain loop =="
python benchmarks/train_step.py --device cuda
echo "== one real CIFAR-10 epoch, resnet18_8xb16_cifar10 recipe =="
common=(model=resnet18 dataset=cifar10 dataset.format=imagefolder "dataset.root=$data" trainer.device=cuda
        trainer.num_workers=8)
python benchmarks/epoch.py "${common[@]}"                        # faithful: BN over 16 images
python benchmarks/epoch.py "${common[@]}" trainer.micro_batch=128 # one forward of 128 per step
