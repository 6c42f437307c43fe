#!/usr/bin/env bash
# Builds localhost/banaserve:dev from deploy/Dockerfile on the local base image, with this
# machine's CPU torch wheel (pip's find-links directory) in the build context, and pip's CA
# bundle (a TLS-intercepting proxy) as a build secret, so it is not left in the image.
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${IMAGE:-localhost/banaserve:dev}
base=${BASE_IMAGE:-localhost/banaserve-base:bookworm}
links=$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)
for wheel in "$links"/torch-2.13.0+cpu-*.whl; do
	[ -e "$wheel" ] && cp -u "$wheel" deploy/wheels/
done
ca=$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)
podman build --secret "id=pip_ca,src=$ca" \
	--build-arg "BASE_IMAGE=$base" --build-arg TORCH_INDEX_URL= --build-arg MODELS=tiny-llama \
	-t "$image" -f deploy/Dockerfile .
podman image ls "$image"
