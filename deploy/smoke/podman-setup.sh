#!/usr/bin/env bash
# Makes a bare Debian machine (root, no Docker daemon) run the compose file: Debian's rootful
# podman + runc, docker-compose against podman's Docker-compatible API socket, mmdebstrap for a
# local base image. Idempotent; prints the socket's DOCKER_HOST on its last line.
set -euo pipefail
need=()
for cmd in podman runc mmdebstrap docker-compose; do
	command -v "$cmd" >/dev/null 2>&1 || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc mmdebstrap docker-compose
fi
# crun (podman's default runtime) fails in this sandbox; runc works. The default nofile limit is
# above what an unprivileged sandbox may grant, so containers get the host's hard limit.
conf=/etc/containers/containers.conf
hard=$(ulimit -Hn)
mkdir -p /etc/containers
if ! grep -q 'banaserve deploy/smoke' "$conf" 2>/dev/null; then
	cat >>"$conf" <<CONF
# banaserve deploy/smoke/podman-setup.sh
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
fi
sock=/run/podman/podman.sock
if ! curl -sf --unix-socket "$sock" http://d/_ping >/dev/null 2>&1; then
	mkdir -p /run/podman
	nohup podman system service --time=0 "unix://$sock" </dev/null >/tmp/podman-service.log 2>&1 &
	echo $! >/run/podman/banaserve-service.pid  # started here: deploy/smoke/smoke.sh stops it
	for _ in $(seq 100); do
		curl -sf --unix-socket "$sock" http://d/_ping >/dev/null 2>&1 && break
		sleep 0.1
	done
fi
echo "DOCKER_HOST=unix://$sock"
