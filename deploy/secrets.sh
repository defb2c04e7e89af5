#!/usr/bin/env bash
# Create Kiln's secrets with random values; nothing secret is committed to the repository.
#
#   deploy/secrets.sh compose            write deploy/.env for deploy/compose.yaml
#   deploy/secrets.sh k8s-dev [ns]       create the Secrets the dev overlay needs (namespace: kiln)
#
# Production Secrets hold the managed services' URLs and keys; create them the same way by hand
# (see docs/OPERATIONS.md, "Secrets"). Existing Secrets and an existing deploy/.env are kept.
set -euo pipefail
cd "$(dirname "$0")"
rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
SERVICES=(gateway agent sandbox budget snapshot webhooks setup admin)

case "${1:-}" in
compose)
  if [[ -e .env ]]; then echo "deploy/.env exists; keeping it"; exit 0; fi
  umask 077
  {
    for s in "${SERVICES[@]}"; do echo "KILN_NATS_PASSWORD_${s^^}=$(rand)"; done
    echo "KILN_POSTGRES_PASSWORD=$(rand)"
    echo "KILN_REDIS_PASSWORD=$(rand)"
    echo "KILN_MINIO_PASSWORD=$(rand)"
    echo "ANTHROPIC_API_KEY="
    echo "E2B_API_KEY="
    echo "KILN_SANDBOX_PROVIDER=local"
  } > .env
  echo "wrote deploy/.env"
  ;;
k8s-dev)
  ns="${2:-kiln}"
  kc() { kubectl -n "$ns" "$@"; }
  secret() {  # name key=value ...
    local name="$1"; shift
    if kc get secret "$name" >/dev/null 2>&1; then echo "secret/$name exists; keeping it"; return; fi
    local args=(); for kv in "$@"; do args+=("--from-literal=$kv"); done
    kc create secret generic "$name" "${args[@]}"
  }
  kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
  for s in "${SERVICES[@]}"; do secret "kiln-nats-$s" "password=$(rand)"; done
  pg="$(rand)"; rd="$(rand)"; mn="$(rand)"
  secret kiln-postgres "password=$pg"
  secret kiln-database "url=postgresql://kiln:$pg@postgres:5432/kiln"
  secret kiln-redis-auth "password=$rd"
  secret kiln-redis "url=redis://:$rd@redis:6379/0"
  secret kiln-minio "root-password=$mn"
  secret kiln-s3 "access-key-id=kiln" "secret-access-key=$mn"
  secret kiln-anthropic "api-key=${ANTHROPIC_API_KEY:-}"
  secret kiln-e2b "api-key=${E2B_API_KEY:-}"
  ;;
*)
  sed -n '2,9p' "$0"; exit 2
  ;;
esac
