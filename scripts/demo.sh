#!/usr/bin/env bash
# The whole flow on the shipped photos, through `resnet-deploy pipeline`: export -> quantize
# (with its FP32-vs-INT8 check) -> parity against PyTorch -> evaluate on a tiny labelled
# folder -> bench -> report.md with the latency plot -> Triton repository; then `verify`.
# Run through `make demo` (which puts .venv first on PATH). Uses torchvision's ImageNet
# weights when they can be had, else a random init, with a banner: its accuracy means nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
A=artifacts

# The five shipped photos that show an ImageNet class (calibration/LABELS.md), as an
# ImageFolder whose folder names are the class names.
bash scripts/labelled_photos.sh $A/labelled

# 12 photos calibrate; quantize's check runs on the 5 it did not see.
pipeline() {
  resnet-deploy pipeline --calibration calibration --num-samples 12 \
    --eval-images $A/labelled --bench-batch-size 1,8 --triton -o $A "$@"
}

weights=imagenet
status=0
pipeline --weights imagenet || status=$?
if [ "$status" -eq 2 ]; then  # bad input: here, the weights cannot be had offline
  weights=random
  cat >&2 <<'BANNER'

########################################################################
#  ImageNet weights are not available (offline?). Continuing with a    #
#  RANDOM-INIT ResNet-18: every figure below checks the plumbing only. #
#  Its accuracy on the labelled photos is MEANINGLESS (chance level).  #
#  Put resnet18-f37072fd.pth in the torch hub cache                    #
#  (~/.cache/torch/hub/checkpoints/) to run on the real weights.       #
########################################################################

BANNER
  # ImageNet's class names, so the labelled folders map to the same outputs as they
  # would with the real weights.
  pipeline --weights random --labels resnet_deploy/imagenet_classes.txt
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi

echo
resnet-deploy verify $A/manifest.json
echo
echo "demo finished (weights: $weights). Report: $A/report.md (tables and $A/bench.png);"
echo "Triton repository: $A/model_repository/; the labelled photos: $A/labelled/."
if [ "$weights" = random ]; then
  echo "RANDOM WEIGHTS: the accuracy figures above are meaningless; they show the flow runs."
fi
