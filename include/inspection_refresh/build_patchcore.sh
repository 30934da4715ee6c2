#!/usr/bin/env bash
# Build one product's PatchCore bank; run by Airflow's BashOperator with everything in `env`.
#
# Required: PRODUCT_CODE, OK_DIR (normal images), OUT_DIR (fresh staging directory).
# Optional: DEFECT_DIRS (colon-separated directories of labelled defect images, for AUROC only),
#           PATCHCORE_SHORTER, PATCHCORE_STRIDE, PATCHCORE_LAYERS, PATCHCORE_CORESET,
#           PATCHCORE_SEED, PATCHCORE_WEIGHTS, PATCHCORE_DEVICE, PATCHCORE_BATCH_SIZE,
#           PATCHCORE_RESERVOIR_MAX, PATCHCORE_PIXEL_PCT, PATCHCORE_IMAGE_PCT,
#           PATCHCORE_FEATURE_CACHE (this worker's per-image feature cache directory, kept between
#           builds; a rebuild extracts only new images), PATCHCORE_FEATURE_CACHE_GB (its bound; 0 = off),
#           PYTHON (interpreter, default python3).
# Unset optional values take the builder's defaults. stdout ends with one
# `PATCHCORE_SUMMARY {json}` line; the exit status is non-zero on failure.
set -euo pipefail

fail() {
    echo "build_patchcore.sh: $*" >&2
    exit 2
}

for name in PRODUCT_CODE OK_DIR OUT_DIR; do
    [[ -n "${!name:-}" ]] || fail "environment variable $name is required (PRODUCT_CODE, OK_DIR and OUT_DIR must all be set)"
done
[[ -d "$OK_DIR" ]] || fail "OK_DIR '$OK_DIR' for product '$PRODUCT_CODE' is not a directory"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON '$PYTHON' is not an executable interpreter"

args=(--product "$PRODUCT_CODE" --ok_dir "$OK_DIR" --out_dir "$OUT_DIR")
add_option() {  # add_option FLAG ENV_NAME: pass the flag only when the variable is set and non-empty
    if [[ -n "${!2:-}" ]]; then args+=("$1" "${!2}"); fi
}
add_option --shorter PATCHCORE_SHORTER
add_option --stride PATCHCORE_STRIDE
add_option --layers PATCHCORE_LAYERS
add_option --coreset PATCHCORE_CORESET
add_option --seed PATCHCORE_SEED
add_option --weights PATCHCORE_WEIGHTS
add_option --device PATCHCORE_DEVICE
add_option --batch_size PATCHCORE_BATCH_SIZE
add_option --reservoir_max PATCHCORE_RESERVOIR_MAX
add_option --pixel_pct PATCHCORE_PIXEL_PCT
add_option --image_pct PATCHCORE_IMAGE_PCT
add_option --feature_cache PATCHCORE_FEATURE_CACHE
add_option --feature_cache_gb PATCHCORE_FEATURE_CACHE_GB
if [[ -n "${DEFECT_DIRS:-}" ]]; then
    IFS=':' read -r -a defect_dirs <<< "$DEFECT_DIRS"
    for dir in "${defect_dirs[@]}"; do
        if [[ -n "$dir" ]]; then args+=(--defect_dir "$dir"); fi
    done
fi

echo "build_patchcore.sh: building PatchCore bank for product '$PRODUCT_CODE' from $OK_DIR into $OUT_DIR" >&2
status=0
"$PYTHON" -m inspection_refresh.patchcore.build "${args[@]}" || status=$?
if [[ $status -ne 0 ]]; then
    echo "build_patchcore.sh: PatchCore build FAILED for product '$PRODUCT_CODE' (exit $status); see the log lines above" >&2
    exit "$status"
fi
echo "build_patchcore.sh: PatchCore bank for product '$PRODUCT_CODE' written to $OUT_DIR" >&2
