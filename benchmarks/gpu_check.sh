#!/usr/bin/env bash
# Every GPU check in one go, on a machine with one CUDA GPU (figures for the README's Performance section):
#   bash benchmarks/gpu_check.sh <folder with the extracted CIFAR-10 JPEGs (train/, test/)>
# About 10 minutes on one H100. Each part prints a Markdown table or lines to paste, with the GPU's name.
set -euo pipefail
data=${1:?usage: bash benchmarks/gpu_check.sh <cifar10 imagefolder root>}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== BN groups alone: one pass with groups of 16 vs plain BN vs 8 passes of 16 =="
python benchmarks/bn_groups.py --device cuda --channels-last
python benchmarks/bn_groups.py --device cuda --channels-last --compile

echo "== trainer step vs plain loop (faithful BN groups, compiled, CUDA graphs, accumulation, ImageNet sizes) =="
python benchmarks/train_step.py --device cuda

echo "== real CIFAR-10 epochs of resnet18_8xb16_cifar10 (JPEG copy): before, after, after + CUDA graphs =="
common=(model=resnet18 dataset=cifar10 dataset.format=imagefolder "dataset.root=$data" trainer.device=cuda
        trainer.num_workers=8)
python benchmarks/epoch.py --epochs 1 "${common[@]}" trainer.forward_batch=16 trainer.data_on_device=false
python benchmarks/epoch.py --epochs 2 "${common[@]}"
python benchmarks/epoch.py --epochs 2 "${common[@]}" trainer.compile=reduce-overhead

echo "== estimated wall time of every CIFAR row's full recipe on this GPU =="
python benchmarks/row_times.py --device cuda --steps 20
python benchmarks/row_times.py --device cuda --steps 20 trainer.compile=reduce-overhead
