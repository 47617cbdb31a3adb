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
# The other twelve calibrate, so that quantize's check runs on photos calibration never saw.
labelled="$(find $A/labelled -type f -printf '%f\n')"
mkdir -p $A/calibration
for photo in calibration/*; do
  name="$(basename "$photo")"
  case "$name" in *.md) continue ;; esac
  grep -qxF "$name" <<<"$labelled" || cp -p "$photo" $A/calibration/
done

# The ImageNet weights: from the torch hub cache, else downloaded (hash checked). Asked
# for before the pipeline runs, so that an offline machine takes the random path at once
# and a rerun finds every step up to date.
if python - <<'PY'
import sys
from resnet_deploy.core.errors import UserError
from resnet_deploy.weights.checkpoints import imagenet_checkpoint
try:
    imagenet_checkpoint()
except UserError:
    sys.exit(3)
PY
then
  weights=(--weights imagenet)
else
  weights=(--weights random --labels resnet_deploy/weights/imagenet_classes.txt)
  cat >&2 <<'BANNER'
offline: using random weights (the ImageNet weights cannot be downloaded here)

########################################################################
#  RANDOM-INIT ResNet-18: every figure below checks the plumbing only. #
#  Its accuracy on the labelled photos is MEANINGLESS (chance level).  #
#  Put resnet18-f37072fd.pth in the torch hub cache                    #
#  (~/.cache/torch/hub/checkpoints/) to run on the real weights.       #
########################################################################

BANNER
fi

# Random weights keep ImageNet's class names, so the labelled folders map to the same
# outputs as the real weights' would.
resnet-deploy pipeline "${weights[@]}" --calibration $A/calibration --num-samples 12 \
  --eval-images $A/labelled --bench-batch-size 1,8 --triton -o $A

echo
resnet-deploy verify $A/manifest.json
echo
echo "demo finished (${weights[*]}). Report: $A/report.md (tables and $A/bench.png);"
echo "Triton repository: $A/model_repository/; the labelled photos: $A/labelled/."
if [ "${weights[1]}" = random ]; then
  echo "RANDOM WEIGHTS: the accuracy figures above are meaningless; they show the flow runs."
fi
echo "To run resnet-deploy yourself, put it on PATH: source .venv/bin/activate"
