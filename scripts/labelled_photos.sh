#!/usr/bin/env bash
# Usage: scripts/labelled_photos.sh DEST
# Files the shipped photos that show an ImageNet class (calibration/LABELS.md) into the
# ImageFolder DEST/<class>/<photo>, for `make demo` and the README's evaluate example.
# The folder names are ImageNet's class names, so `evaluate` maps them to a model's labels.
set -euo pipefail
dest="${1:?usage: scripts/labelled_photos.sh DEST}"
photos="$(cd "$(dirname "$0")/../calibration" && pwd)"
# Table rows "| photo | class | why |" whose class is not "-".
rows="$(awk -F' *[|] *' '$2 ~ /\.(jpg|png|bmp|tiff|webp)$/ && $3 != "-" {print $2 "\t" $3}' \
  "$photos/LABELS.md")"
[ -n "$rows" ] || { echo "error: $photos/LABELS.md: no labelled photos found" >&2; exit 2; }
while IFS=$'\t' read -r photo class; do
  mkdir -p "$dest/$class"
  cp -p "$photos/$photo" "$dest/$class/"
done <<<"$rows"
echo "$dest: $(wc -l <<<"$rows") labelled photos in $(cut -f2 <<<"$rows" | sort -u | wc -l) classes"
