# The primitives of a sandbox that runs commands (adapters/script.py), run in its workspace as
#   bash -c "$(cat sandbox.sh)" kiln COMMAND ARG...
# with every argument quoted by the caller: nothing here is assembled from paths. Output records
# are NUL-terminated; exit codes: 3 bad path or tool failure, 4 sha256 mismatch (the actual one
# on stderr), 5 transfer failed (curl's error on stderr).
set -o pipefail

# run COMMAND TIMEOUT_S KEEP: the command in its own session, output to a file, the whole group
# killed at the timeout; prints "rc total timed_out", then head and tail (KEEP bytes each, base64).
cmd_run() {
  local out pid dog rc to total rest
  out=$(mktemp) || exit 90
  setsid bash -c "$1" >"$out" 2>&1 </dev/null &
  pid=$!
  # the marker before the kill: once the command is seen killed, the marker is there
  setsid bash -c 'sleep "$1"; : >"$3"; kill -KILL -- "-$2" 2>/dev/null' _ "$2" "$pid" "$out.to" \
    >/dev/null 2>&1 </dev/null &
  dog=$!
  # where the caller asks (E2B: envd may kill this script at its deadline, not these sessions)
  [ -n "${KILN_RUN_PIDFILE:-}" ] && printf '%s %s\n' "$pid" "$dog" >"$KILN_RUN_PIDFILE"
  wait "$pid"; rc=$?
  kill -KILL -- "-$dog" 2>/dev/null
  to=0; [ -e "$out.to" ] && to=1
  total=$(stat -c %s "$out")
  printf '%s %s %s\n' "$rc" "$total" "$to"
  head -c "$3" "$out" | base64 -w0; echo
  rest=$((total - $3)); [ "$rest" -gt "$3" ] && rest=$3
  [ "$rest" -gt 0 ] && tail -c "$rest" "$out" | base64 -w0; echo
  rm -f "$out" "$out.to" ${KILN_RUN_PIDFILE:+"$KILN_RUN_PIDFILE"}
  exit "$rc"
}

# locate PATH...: for each, its real path relative to the workspace, then "type size mtime mode"
# of what is there (empty: nothing, or outside).
cmd_locate() {
  local p r
  for p in "$@"; do
    r=$(realpath -m --relative-base=. -- "${p:-.}") || exit 3
    printf '%s\0' "$r"
    case $r in
      /* | .. | ../*) ;;
      *) find "./$r" -maxdepth 0 -printf '%y\t%s\t%T@\t%m' 2>/dev/null ;;
    esac
    printf '\0'
  done
}

# fetch MAX PATH: locate's two records for PATH, then (base64) the bytes of the regular file
# it leads to inside the workspace if it has at most MAX of them: a read in one round trip.
cmd_fetch() {
  local r meta size
  r=$(realpath -m --relative-base=. -- "${2:-.}") || exit 3
  printf '%s\0' "$r"
  case $r in
    /* | .. | ../*) printf '\0'; return 0 ;;
  esac
  meta=$(find "./$r" -maxdepth 0 -printf '%y\t%s\t%T@\t%m' 2>/dev/null)
  printf '%s\0' "$meta"
  case $meta in
    f*) size=${meta#*$'\t'}; size=${size%%$'\t'*}
        [ "$size" -le "$1" ] && { base64 -w0 <"./$r" || exit 3; } ;;
  esac
  return 0
}

# store PATH BASE64: locate's two records for PATH as it was, then the decoded bytes written
# there (parents made, through a temporary file) if it leads inside the workspace and is not a
# directory: a write in one round trip.
cmd_store() {
  local r meta tmp
  r=$(realpath -m --relative-base=. -- "$1") || exit 3
  printf '%s\0' "$r"
  case $r in
    /* | .. | ../* | .) printf '\0'; return 0 ;;
  esac
  meta=$(find "./$r" -maxdepth 0 -printf '%y\t%s\t%T@\t%m' 2>/dev/null)
  printf '%s\0' "$meta"
  case $meta in d*) return 0 ;; esac
  mkdir -p -- "$(dirname -- "./$r")" || exit 3
  tmp=$(mktemp -p "$(dirname -- "./$r")" .kiln-wr.XXXXXX) || exit 3
  printf '%s' "$2" | base64 -d >"$tmp" || { rm -f -- "$tmp"; exit 3; }
  chmod 644 -- "$tmp"
  if [ -e "./$r" ]; then chmod --reference="./$r" -- "$tmp" 2>/dev/null; fi
  mv -f -- "$tmp" "./$r" || { rm -f -- "$tmp"; exit 3; }
}

# walk TOP DEPTH LIMIT CONTENT NSKIP SKIP... EXCLUDE...: "type size mtime mode path" and the
# symlink target per entry (DEPTH, LIMIT: empty for no limit; SKIP: directory names listed but
# not entered; EXCLUDE: name or path patterns left out); with CONTENT=1 then "--sha256--" and
# sha256sum's "digest  path" of every regular file.
cmd_walk() {
  local top=. depth=$2 limit=$3 content=$4 nskip=$5 i p
  [ -n "$1" ] && top=./$1
  shift 5
  local -a base=("$top" -mindepth 1) skip=() exclude=()
  [ -n "$depth" ] && base+=(-maxdepth "$depth")
  for ((i = 0; i < nskip; i++)); do skip+=(-o -name "$1"); shift; done
  for p in "$@"; do exclude+=(-o -name "$p" -o -path "./$p"); done
  ((${#exclude[@]})) && base+=(\( "${exclude[@]:1}" \) -prune -o)
  local fmt='%y\t%s\t%T@\t%m\t%p\0%l\0'
  local -a listed=("${base[@]}") hashed=("${base[@]}")
  if ((${#skip[@]})); then
    listed+=(-type d \( "${skip[@]:1}" \) -printf "$fmt" -prune -o)
    hashed+=(-type d \( "${skip[@]:1}" \) -prune -o)
  fi
  if [ -n "$limit" ]; then
    find "${listed[@]}" -printf "$fmt" 2>/dev/null | head -z -n "$((2 * limit))"
  else
    find "${listed[@]}" -printf "$fmt" 2>/dev/null
  fi
  if [ "$content" = 1 ]; then
    printf -- '--sha256--\0'
    find "${hashed[@]}" -type f -print0 2>/dev/null | xargs -0 -r sha256sum -z -- 2>/dev/null
  fi
  return 0
}

# put PATH SHA256 URL TIMEOUT_S: PUT the file if it hashes to SHA256 and its real path is in the
# workspace (else exit 6); prints its size.
cmd_put() {
  local h
  case $(realpath -m --relative-base=. -- "$1") in  # confined here: no round trip to resolve it
    /* | .. | ../*) printf '%s resolves outside the workspace' "$1" >&2; exit 6 ;;
  esac
  h=$(sha256sum <"./$1" | cut -c1-64) || exit 3
  [ "$h" = "$2" ] || { printf '%s' "$h" >&2; exit 4; }
  curl -sS --fail-with-body --max-time "$4" -X PUT -T "./$1" -o /dev/null --url "$3" || exit 5
  stat -c %s -- "./$1"
}

# get URL PATH SHA256 MODE TIMEOUT_S: GET into a temporary file, check it, chmod, move it into
# place; prints its size.
cmd_get() {
  local tmp h
  mkdir -p -- "$(dirname -- "./$2")" || exit 3
  tmp=$(mktemp -p . .kiln-dl.XXXXXX) || exit 3
  curl -sS --fail --max-time "$5" -o "$tmp" --url "$1" || { rm -f -- "$tmp"; exit 5; }
  h=$(sha256sum <"$tmp" | cut -c1-64)
  [ "$h" = "$3" ] || { rm -f -- "$tmp"; printf '%s' "$h" >&2; exit 4; }
  chmod -- "$4" "$tmp" && mv -f -- "$tmp" "./$2" && stat -c %s -- "./$2"
}

# apply (OP PATH ARG)...: mkdir (with parents), symlink (ARG the target), chmod (ARG the
# octal mode), unlink; in order, stopping at the first failure.
cmd_apply() {
  while [ $# -ge 3 ]; do
    case $1 in
      mkdir) mkdir -p -- "./$2" ;;
      symlink)
        if [ -d "./$2" ] && [ ! -L "./$2" ]; then
          printf 'cannot restore symlink %s: a directory is there\n' "$2" >&2
          exit 3
        fi
        ln -sfn -- "$3" "./$2"
        ;;
      chmod) chmod -- "$3" "./$2" ;;
      unlink) rm -f -- "./$2" ;;
      *) printf 'unknown change %s\n' "$1" >&2; exit 2 ;;
    esac || exit 3
    shift 3
  done
}

case ${1-} in
  run | locate | fetch | store | walk | put | get | apply) cmd=cmd_$1; shift; "$cmd" "$@" ;;
  *) printf 'unknown command %s\n' "${1-}" >&2; exit 2 ;;
esac
