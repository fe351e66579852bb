#!/usr/bin/env bash
# The whole job on the Fashion-MNIST default: set-up, data, training, encoding, evaluation, retrieval, demo.
#   bash run.sh             # CUDA present: all 60,000/10,000 images at 224 px; CPU: the quick mode (its training about 11 min on 2 cores)
#   BITS=64 bash run.sh     # another code length
# Works offline where the Debian package dataset-fashion-mnist can be installed (or its idx files are present).
set -euo pipefail
cd "$(dirname "$0")"
BITS=${BITS:-48}
python -m pip install -q -r requirements.txt
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
    || echo "dataset-fashion-mnist not installed; prepare_data.py will try torchvision's download"
fi
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== CUDA: full mode (60,000 training images, 10,000 queries, 224 px)"
  PREPARE=(); TRAIN=(--img-size 224 --epochs 30 --batch-size 256)
else
  echo "== CPU: quick mode (6,000 training images, 500 queries, 64 px)"
  PREPARE=(--limit-per-class 600 --limit-test-per-class 50); TRAIN=(--img-size 64 --epochs 14 --device cpu)
fi
set -x
python prepare_data.py fashion-mnist "${PREPARE[@]}"
python mytrain.py --bits "$BITS" --pretrained none "${TRAIN[@]}"
python database.py --bits "$BITS"
python mAP.py --bits "$BITS"
python search.py --bits "$BITS"
python query.py --bits "$BITS"
python demo.py --bits "$BITS" --num 0
