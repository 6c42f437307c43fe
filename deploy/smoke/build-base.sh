#!/usr/bin/env bash
# No registry is reachable here, so the smoke test's base image is a minimal Debian bookworm
# root file system from Debian's own packages (the mirror apt uses), imported into podman as
# localhost/banaserve-base:bookworm. It stands in for python:3.11-slim-bookworm (the image's
# build and run stages) and for the official redis image. Skipped when the image exists.
set -euo pipefail
image=${BASE_IMAGE:-localhost/banaserve-base:bookworm}
if podman image exists "$image"; then
	echo "$image exists"
	exit 0
fi
mirror=$(grep -h -m1 -o 'http[^ ]*debian$' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | head -1 || true)
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,redis-server \
	bookworm "$tar" ${mirror:+"$mirror"}
podman import --change 'CMD ["/bin/bash"]' "$tar" "$image"
podman image ls "$image"
