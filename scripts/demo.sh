#!/usr/bin/env bash
# The main job on the embedded defaults: export -> quantize -> FP16 -> parity -> bench,
# all on the shipped calibration/ photos. Run through `make demo` (which puts .venv first
# on PATH). Uses torchvision's ImageNet weights when they can be had, else a random init.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts
A=artifacts

weights=imagenet
if ! resnet-deploy export --weights imagenet -o $A/resnet18.onnx --json $A/export.json; then
  weights=random
  cat >&2 <<'BANNER'

########################################################################
#  ImageNet weights are not available (offline?). Continuing with a    #
#  RANDOM-INIT ResNet-18: every figure below checks the plumbing only, #
#  not accuracy. Put resnet18-f37072fd.pth in the torch hub cache      #
#  (~/.cache/torch/hub/checkpoints/) to run on the real weights.       #
########################################################################

BANNER
  resnet-deploy export --weights random -o $A/resnet18.onnx --json $A/export.json
fi

# 12 photos calibrate; the other 5 are held out for the built-in FP32-vs-INT8 check.
resnet-deploy quantize --model $A/resnet18.onnx --calibration calibration --num-samples 12 \
  -o $A/resnet18.int8.onnx --json $A/quantize.json
resnet-deploy convert-fp16 $A/resnet18.onnx -o $A/resnet18.fp16.onnx
resnet-deploy parity --weights $weights --model $A/resnet18.onnx \
  --model $A/resnet18.fp16.onnx --model $A/resnet18.int8.onnx --images calibration \
  --json $A/parity.json
resnet-deploy bench --model $A/resnet18.onnx --model $A/resnet18.int8.onnx --torch \
  --weights $weights --batch-size 1,8 --iterations 30 \
  --json $A/bench.json --markdown $A/bench.md
echo
echo "demo finished (weights: $weights); reports are in $A/"
