#!/usr/bin/env bash
# Wheels that a bare GPU machine (CPython 3.12, manylinux x86_64, torch/Triton/transformers already there,
# no package index) lacks for `make gpu-check`, into an ignored folder (default .whl/). Run it on a machine
# WITH the package index, from the repository root:
#
#     bash benchmarks/gpu_wheels.sh [DEST]          # then carry DEST to the GPU machine
#
# What goes in, and why only that (the set must stay small: it travels with the checkout):
#   deepspeed       the engine and the HF baseline; an sdist on PyPI, so it is built here into a py3 wheel with
#                   no prebuilt ops (DS_BUILD_OPS=0, DS_ACCELERATOR=cuda). The GPU path JIT-builds nothing:
#                   the engine passes torch optimizers (AdamW, Adafactor) as client objects.
#   hjson, pydantic, pydantic-core (cp312), annotated-types, typing-inspection, typing-extensions
#                   deepspeed's imports that the image lacks (msgpack, ninja, py-cpuinfo, psutil, einops,
#                   numpy, packaging, tqdm are there). typing-extensions is installed by gpu_check only where
#                   the machine's copy is older than pydantic needs.
#   liger-kernel    the fused-linear-CE baseline of bench_loss_gpu (pure Python over the machine's Triton).
# Left out on purpose: datasets and openai (imported lazily, only by the HF-hub loader and the OpenAI teacher,
# which no gpu-check stage runs), torch/triton/transformers/accelerate (the machine's own are used).
# Versions come from constraints.txt, so the GPU run uses what the CPU suite tested.
#
# Last, the set is checked: installed with `pip install --no-index --no-deps --target` under CPython 3.12
# manylinux tags (as gpu_check --install does there), then imported (deepspeed, pydantic, liger_kernel)
# from a scratch target with this machine's torch. When the local interpreter is not 3.12, that import
# check installs the same pure wheels plus the local-ABI twin of each binary wheel (same version); a
# CPython 3.12 found here (PY312, python3.12, pyenv's) also loads pydantic-core's cp312 build itself.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"   # not a dependency of the project: its own pin here
TAGS=(--python-version 3.12 --implementation cp --abi cp312
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

pin() {  # the version constraints.txt pins for a distribution (names compared case/underscore-insensitively)
  local want
  want="$(echo "$1" | tr 'A-Z_' 'a-z-')"
  awk -F'==' -v w="$want" '!/^#/ && NF == 2 { n = tolower($1); gsub("_", "-", n); if (n == w) print $2 }' \
    "$REPO/constraints.txt"
}

req() {
  local v
  v="$(pin "$1")"
  if [ -z "$v" ]; then echo "gpu_wheels: $1 is not pinned in constraints.txt" >&2; exit 1; fi
  echo "$1==$v"
}

BINARY=(pydantic_core)
PURE=(hjson pydantic annotated-types typing-inspection typing_extensions)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
WORK="$(mktemp -d /tmp/specialize-gpu-wheels.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "== downloading wheels for CPython 3.12 manylinux x86_64 into $DEST"
specs=()
for name in "${BINARY[@]}" "${PURE[@]}"; do specs+=("$(req "$name")"); done
specs+=("liger-kernel==$LIGER_VERSION")
"$PY" -m pip download -q --no-deps --only-binary=:all: "${TAGS[@]}" -d "$DEST" "${specs[@]}"

echo "== building deepspeed $(pin deepspeed) (py3 wheel, no prebuilt ops)"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$WORK/sdist" "$(req deepspeed)"
# An isolated build has no torch, which is what we want: DeepSpeed then records no ops and no torch build
# info, and JIT-loads any op it needs at run time against the machine's own torch.
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps -w "$DEST" "$WORK"/sdist/deepspeed-*.tar.gz

echo "== checking the set installs under CPython 3.12 manylinux tags (no index, no deps)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site312" "${TAGS[@]}" "$DEST"/*.whl

# A CPython 3.12 here (PY312, python3.12 on the PATH, or pyenv's) loads the cp312 binary wheels themselves.
if [ -z "${PY312:-}" ]; then  # the first candidate that really runs (a pyenv shim may not)
  for cand in $(command -v python3.12 || true) "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [ -x "$cand" ] && "$cand" -c pass 2>/dev/null; then PY312="$cand"; break; fi
  done
fi
if [ -n "${PY312:-}" ]; then
  echo "== importing pydantic (its cp312 pydantic-core) and hjson from that target with $PY312"
  PYTHONPATH="$WORK/site312" "$PY312" -c 'import sys, hjson, pydantic, pydantic_core
site = sys.argv[1]
assert pydantic_core.__file__.startswith(site), pydantic_core.__file__
class Probe(pydantic.BaseModel):
    stage: int
assert Probe(stage="3").stage == 3 and hjson.loads("{a: 1}") == {"a": 1}
print(f"   pydantic {pydantic.VERSION} / pydantic-core {pydantic_core.__version__} load under Python {sys.version.split()[0]}")' "$WORK/site312"
fi

echo "== checking deepspeed imports from a scratch target with this machine's torch"
local_tag="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
if [ "$local_tag" = "312" ]; then
  SITE="$WORK/site312"
else
  SITE="$WORK/site$local_tag"
  mkdir -p "$WORK/twins"
  twins=()
  for name in "${BINARY[@]}"; do twins+=("$(req "$name")"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/twins" "${twins[@]}"
  pure_wheels=()
  for w in "$DEST"/*.whl; do
    case "$(basename "$w")" in *-cp312-*) ;; *) pure_wheels+=("$w") ;; esac
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${pure_wheels[@]}" "$WORK"/twins/*.whl
  echo "   (local Python is $local_tag, not 312: binary wheels replaced by their cp$local_tag twins for this check)"
fi
PYTHONPATH="$SITE" "$PY" - "$SITE" <<'EOF'
import sys
site = sys.argv[1]
sys.path.insert(0, site)
import torch
import deepspeed
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: F401
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: F401
import hjson, pydantic, liger_kernel  # noqa: E401,F401
for mod in (deepspeed, pydantic, hjson, liger_kernel):
    if not mod.__file__.startswith(site):
        sys.exit(f"gpu_wheels: {mod.__name__} came from {mod.__file__}, not from the scratch target {site}")
print(f"   deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, torch {torch.__version__}: "
      f"imported from {site}")
EOF

echo "== the set ($DEST)"
ls -l "$DEST"/*.whl | awk '{printf "   %8.2f MiB  %s\n", $5 / 1048576, $NF}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "   %8.2f MiB  in all\n", $1 / 1048576}'
