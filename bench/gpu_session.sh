#!/usr/bin/env bash
# Everything a session that is lent a GPU should measure, as one prepared run (about 4 minutes
# on an H200, at most 9.5 minutes: each part has its own time limit, the benchmark runs first, and
# a failing part does not stop the others):
#
#     bash bench/gpu_session.sh [OUT_DIR]       # default: $OUT (the device tool's folder), else runs/gpu
#
#   gpu.txt        the GPU, driver, torch and CUDA versions
#   gpu_cifar.*    bench/gpu_cifar.py: ResNet-18 CIFAR-10 epochs, on-device vs DataLoader pipeline,
#                  vanilla vs NSR, bf16, and the check that the NSR step makes no host sync
#   tests.txt      the CUDA tests: NSR against the naive reference on CUDA, labels, memory moving
#                  to the GPU, tensor augmentation, the CNNs, a bf16 + channels_last run that resumes
#   smoke.txt      fdnn_nsr.py and cnn_nsr.py on fake data on the GPU
# Record the figures and the GPU in docs/speed.md.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

part() { echo; echo "== $1"; }

part gpu
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"

part gpu_cifar
timeout 300 $py bench/gpu_cifar.py --out "$out" 2>&1 | tee "$out/gpu_cifar.txt"

part tests
timeout 150 $py -m pytest -p no:cacheprovider -rs tests/test_nsr_loss.py tests/test_nsr_arguments.py \
    tests/test_hooks_and_layer_names.py tests/test_augment.py \
    tests/test_models_cnn.py tests/test_cnn_engine.py 2>&1 | tail -15 | tee "$out/tests.txt"

part smoke
# Runs write checkpoints (VGG-19: 160 MB) outside $out; only their metrics come back.
runs=$(mktemp -d)
{
  timeout 45 $py fdnn_nsr.py --config configs/mlp4.yaml --dataset fake --fake-size 20000 --epochs 2 \
      --device cuda --out "$runs/mlp4" --quiet
  timeout 60 $py cnn_nsr.py --config configs/vgg19_cifar10.yaml --dataset fake --fake-size 5000 \
      --epochs 1 --device cuda --out "$runs/vgg19" --quiet
} 2>&1 | tee "$out/smoke.txt"
for run in mlp4 vgg19; do
  cp "$runs/$run/metrics.json" "$out/smoke-$run-metrics.json" 2>/dev/null
done
rm -rf "$runs"
