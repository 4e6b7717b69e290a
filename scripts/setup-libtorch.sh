#!/usr/bin/env bash
# Installs the CPU parts of libtorch 2.11.0 (the version tch 0.24 binds) from the PyPI wheels into a
# per-user cache, and links it as .libtorch in the repository, where .cargo/config.toml points
# LIBTORCH. Safe to run again: it does nothing when the cache is already complete.
set -euo pipefail

TORCH_VERSION=2.11.0
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${RTRAIN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rtrain}
dest=$cache/libtorch-$TORCH_VERSION
stamp=$dest/.complete

if [ ! -f "$stamp" ]; then
  echo "setup-libtorch: installing libtorch $TORCH_VERSION into $dest (one download of ~550 MB)"
  python3 -m pip --version >/dev/null 2>&1 || { echo "setup-libtorch: needs python3 with pip" >&2; exit 1; }
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.11 --implementation cp \
    -d "$wheels" "torch==$TORCH_VERSION" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cupti==13.0.*"
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial/lib"
  python3 - "$wheels" "$dest.partial" <<'PY'
import pathlib, shutil, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wanted_libs = {"libtorch_cpu.so", "libc10.so", "libgomp.so.1", "libtorch.so",
               "libcudart.so.13", "libcupti.so.13"}
found = set()
for whl in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            if name.startswith("torch/include/") and not name.endswith("/"):
                target = out / "include" / name[len("torch/include/"):]
            elif base in wanted_libs and "/lib/" in name:
                target = out / "lib" / base
                found.add(base)
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
missing = wanted_libs - found
if missing:
    sys.exit(f"setup-libtorch: the wheels lacked {sorted(missing)}")
PY
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  touch "$stamp"
fi

ln -sfn "$dest" "$repo/.libtorch"
echo "setup-libtorch: libtorch $TORCH_VERSION ready at $repo/.libtorch"
