#!/usr/bin/env bash
# Build and run nola's images on a host with a Docker engine but without Docker Hub or
# download.pytorch.org: only a Debian mirror and PyPI (possibly behind a TLS-intercepting proxy
# whose CA is in the host's /etc/ssl/certs/ca-certificates.crt), and PyTorch wheels on disk.
# deploy/README.md ("Verified offline") says what this ran here and what it substitutes.
#
#   deploy/offline_build.sh base      debootstrap'ed Debian bookworm + python3 -> $BASE_IMAGE,
#                                     + Debian's PostgreSQL 15 -> $PG_IMAGE (compose's postgres)
#   deploy/offline_build.sh build     Dockerfile.cpu and Dockerfile.dagster (classic builder),
#                                     pip pointed at a local wheel mirror on 127.0.0.1:$PORT
#   deploy/offline_build.sh run       `nola demo` in the user-code image (uid 10001, volumes for
#                                     /data /artifacts /models); the code server and its HEALTHCHECK
#   deploy/offline_build.sh compose   compose.yaml (CPU variant) with docker-compose v1, the demo
#                                     dataset dropped on the data volume, one run launched by the daemon
#   deploy/offline_build.sh all       the four in order
#
# The engine used here was a second dockerd with overlay2 (the machine's own ran vfs, a full copy
# per layer, ~60 GB for the user-code build):
#   dockerd --data-root /var/lib/docker-nola --exec-root /var/run/docker-nola --pidfile \
#     /var/run/docker-nola.pid -H unix:///var/run/docker-nola.sock --storage-driver=overlay2 \
#     --iptables=false --bridge=none &   export DOCKER_HOST=unix:///var/run/docker-nola.sock
# Settings (environment): DOCKER_HOST (which engine), WORK (scratch space), MIRROR_ROOT (folder of
# PEP 503 indexes served over HTTP; torch's index at $MIRROR_ROOT/pypi-more/simple), TAG.
# The build context is `git archive HEAD`: committed code only (the root .dockerignore, which the
# classic builder reads, allows the same files).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/nola-offline}
BASE_IMAGE=${BASE_IMAGE:-nola-local/python:3.11-bookworm}
PG_IMAGE=${PG_IMAGE:-nola-local/postgres:15-bookworm}
TAG=${TAG:-$(git -C "$ROOT" rev-parse --short HEAD)-offline}
PORT=${PORT:-8765}
MIRROR_ROOT=${MIRROR_ROOT:-/opt}
M=http://127.0.0.1:$PORT
SOCK=${DOCKER_HOST:-unix:///var/run/docker.sock}; SOCK=${SOCK#unix://}
TORCH_INDEX=${TORCH_INDEX:-$M/pypi-more/simple}
PIP_EXTRA=${PIP_EXTRA:-$M/pypi/simple https://pypi.org/simple}
mkdir -p "$WORK"
log() { printf '\n== %s\n' "$*" >&2; }

base() {
  log "Debian bookworm rootfs -> $BASE_IMAGE (kept if it exists: a new import would void the build cache)"
  local rootfs=$WORK/rootfs
  if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    [ -x "$rootfs/usr/bin/python3" ] || debootstrap --variant=minbase \
      --include=python3,python3-venv,python-is-python3,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
    # Trust what the host trusts (the proxy's CA), for pip inside the builds.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE"
  fi

  log "Debian PostgreSQL 15 -> $PG_IMAGE (stand-in for postgres:17.2-bookworm: same env and paths)"
  mkdir -p "$WORK/postgres"
  cat > "$WORK/postgres/entrypoint.sh" <<'EOF'
#!/bin/sh
# The official image's contract, reduced: POSTGRES_USER/PASSWORD/DB on first start, PGDATA.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=$(mktemp); printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pw" --auth-local=trust --auth-host=scram-sha-256
  rm -f "$pw"; echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start
  [ "$POSTGRES_DB" = postgres ] || createdb -U "$POSTGRES_USER" "$POSTGRES_DB"
  pg_ctl -D "$PGDATA" -w stop
fi
exec postgres -D "$PGDATA" -c listen_addresses='*'
EOF
  chmod +x "$WORK/postgres/entrypoint.sh"
  cat > "$WORK/postgres/Dockerfile" <<EOF
FROM $BASE_IMAGE
RUN mkdir -p /etc/postgresql-common && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.conf \\
 && apt-get update && apt-get install -y --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY entrypoint.sh /usr/local/bin/entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:\$PATH PGDATA=/var/lib/postgresql/data
USER postgres
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
EOF
  docker build --network host -t "$PG_IMAGE" "$WORK/postgres"
}

mirror() {  # a local index over HTTP (pip treats 127.0.0.1 as secure); stopped on exit
  curl -fsS -o /dev/null "$M/" 2>/dev/null && return
  python3 -m http.server --bind 127.0.0.1 "$PORT" --directory "$MIRROR_ROOT" > "$WORK/mirror.log" 2>&1 &
  local pid=$!; trap "kill $pid" EXIT; sleep 1
}

build() {
  mirror
  git -C "$ROOT" archive --format=tar HEAD pyproject.toml README.md nola_core nola_assets prompts deploy/docker \
    > "$WORK/context.tar"
  local args=(--network host --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "PIP_INDEX_URL=$TORCH_INDEX"
              --build-arg "PIP_EXTRA_INDEX_URL=$PIP_EXTRA")
  log "Dockerfile.cpu -> nola-user-code:$TAG"
  time docker build "${args[@]}" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX" \
    -f deploy/docker/Dockerfile.cpu -t "nola-user-code:$TAG" - < "$WORK/context.tar"
  log "Dockerfile.dagster -> nola-dagster:$TAG"
  time docker build "${args[@]}" -f deploy/docker/Dockerfile.dagster -t "nola-dagster:$TAG" - < "$WORK/context.tar"
  docker image ls --filter "reference=nola-*"
}

run() {
  local image=nola-user-code:$TAG v=(-v nola_offline_data:/data -v nola_offline_artifacts:/artifacts
                                       -v nola_offline_models:/models)
  log "user and torch in $image"
  docker run --rm --network none "$image" sh -c 'id; python -c "import torch, nola_assets.definitions as d; print(torch.__version__, d.defs is not None)"'
  log "nola demo in $image (fresh named volumes)"
  docker volume rm -f nola_offline_data nola_offline_artifacts nola_offline_models > /dev/null
  time docker run --rm --network none "${v[@]}" "$image" nola demo
  docker run --rm --network none "${v[@]}" "$image" sh -c 'ls -ln /data /artifacts/fashion_mini'
  log "the code server (image CMD) and its HEALTHCHECK"
  docker rm -f nola-offline-grpc > /dev/null 2>&1 || true
  docker run -d --name nola-offline-grpc --network none "${v[@]}" "$image" > /dev/null
  for _ in $(seq 40); do
    status=$(docker inspect -f '{{.State.Health.Status}}' nola-offline-grpc)
    [ "$status" = starting ] || break; sleep 3
  done
  echo "health: $status"; docker exec nola-offline-grpc dagster api grpc-health-check --port 4000
  docker rm -f nola-offline-grpc > /dev/null
  [ "$status" = healthy ]
}

compose() {
  # docker-compose v1 (Debian bookworm's 1.29) rejects the top-level `name:` of compose.yaml:
  # a copy without it, and `-p nola` for the same project name.
  sed '/^name: nola$/d' "$ROOT/deploy/compose.yaml" > "$WORK/compose.v1.yaml"
  cat > "$WORK/compose.override.yaml" <<EOF
services:
  postgres:
    image: $PG_IMAGE
  daemon:
    volumes: ["$SOCK:/var/run/docker.sock"]
  webserver:
    volumes: ["$SOCK:/var/run/docker.sock"]
EOF
  local pw; pw=$(sed -n 's/^POSTGRES_PASSWORD=//p' "$WORK/compose.env" 2>/dev/null | tail -1)  # the volume's
  [ -n "$pw" ] || pw=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  { cat "$ROOT/deploy/.env.example"
    printf '%s\n' "NOLA_IMAGE_TAG=$TAG" NOLA_VARIANT=cpu NOLA_DAGSTER_YAML=dagster.cpu.yaml "POSTGRES_PASSWORD=$pw" \
      "DOCKER_GID=$(stat -c %g "$SOCK")" NOLA_MODEL_PROFILE=tiny NOLA_DEVICE=cpu NOLA_NUM_WORKERS=0 \
      "NOLA_WEBSERVER_PORT=${NOLA_WEBSERVER_PORT:-3300}"; } > "$WORK/compose.env"
  dc() { docker-compose --project-directory "$ROOT/deploy" -p nola --env-file "$WORK/compose.env" \
           -f "$WORK/compose.v1.yaml" -f "$WORK/compose.override.yaml" "$@"; }
  log "docker-compose up (no build: the images of the build step)"
  dc up -d --no-build
  for _ in $(seq 60); do state=$(dc ps); grep -q "starting" <<< "$state" || break; sleep 5; done
  echo "$state"
  local url=http://127.0.0.1:${NOLA_WEBSERVER_PORT:-3300}
  curl -fsS "$url/server_info"; echo
  dc exec -T daemon dagster-daemon liveness-check && echo "daemon: heartbeats ok"
  log "the README's way to add the demo dataset; the sensor should queue a run, the daemon launch it"
  dc exec -T user_code sh -c 'test -d /data/fashion_mini || python -c "import shutil; from nola_core.demo \
    import demo_dataset_path; shutil.copytree(demo_dataset_path(), \"/data/fashion_mini\")"'
  local q='{"query":"{ runsOrError { ... on Runs { results { runId status startTime endTime } } } }"}' status
  for _ in $(seq 180); do  # the newest run; CPU and 50 epochs per training: several minutes
    status=$(curl -fsS -H 'Content-Type: application/json' -d "$q" "$url/graphql" | python3 -c \
      'import json, sys; r = json.load(sys.stdin)["data"]["runsOrError"]["results"]; print(r[0] if r else "no run")')
    grep -qE "'(SUCCESS|FAILURE|CANCELED)'" <<< "$status" && break; sleep 10
  done
  echo "newest run: $status"
  grep -q "'SUCCESS'" <<< "$status"
}

cd "$ROOT"
case ${1:-all} in
  base|build|run|compose) "$1" ;;
  all) base; build; run; compose ;;
  *) echo "usage: $0 [base|build|run|compose|all]" >&2; exit 2 ;;
esac
