"""The shell scripts behind background processes, each one ``Machine.run`` in the build's sandbox,
written once for every provider: start (a wrapper that keeps a directory per process in the
machine's ``process_dir``), read the output, look at the live ones, stop them; and the limits
the tools keep to."""

from __future__ import annotations

import shlex

MAX_COMMAND_CHARS = 2_000  # of a command, in the events
READ_CHUNK = 256 * 1024  # bytes of new output bash_output fetches at most per call
SHOW_CHARS = 28_000  # characters of output bash_output shows at most (its header and notes fit
# beside them under the 30,000 of any tool result)
STOP_GRACE_S = 3  # SIGTERM, then SIGKILL after this long
SCRIPT_TIMEOUT_S = 30.0

START = r"""
D=$1/$2
mkdir -p -- "$1" || exit 90
if ! mkdir -- "$D" 2>/dev/null; then printf 'already %s\n' "$(cat -- "$D/pid" 2>/dev/null)"; exit 0; fi
: >"$D/out"
setsid bash -c 'echo $$ >"$1/pid.tmp" && mv "$1/pid.tmp" "$1/pid"
bash -c "$2" >>"$1/out" 2>&1 </dev/null
echo $? >"$1/rc.tmp" && mv "$1/rc.tmp" "$1/rc"' _ "$D" "$3" >/dev/null 2>&1 </dev/null &
i=0
while [ ! -s "$D/pid" ] && [ "$i" -lt 500 ]; do sleep 0.01; i=$((i + 1)); done
printf 'started %s\n' "$(cat -- "$D/pid" 2>/dev/null)"
"""

# listening SID: the TCP ports on which the processes of session SID listen (from /proc: their
# sockets' inodes, matched against /proc/net/tcp{,6} entries in state LISTEN).
LISTENING = r"""
listening() {
  local sid=$1 d s inodes=
  for d in /proc/[0-9]*; do
    s=$(cat "$d/stat" 2>/dev/null) || continue
    s=${s##*) }; set -- $s
    [ "$4" = "$sid" ] || continue
    inodes="$inodes $(ls -l "$d/fd" 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\].*/\1/p' | tr '\n' ' ')"
  done
  [ -n "${inodes// /}" ] || return 0
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v want="$inodes" '
    BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) ok[w[i]] = 1 }
    $4 == "0A" && ($10 in ok) { split($2, a, ":"); print a[2] }
  ' 2>/dev/null | while read -r h; do echo $((16#$h)); done | sort -un | tr '\n' ' '
}
"""

# state OFFSET MAX: "<status> <rc> <size>" then the output from OFFSET (at most MAX bytes, base64).
# The status is taken before the output is read: an exited process's output is all there.
OUTPUT = r"""
D=$1/$2
[ -d "$D" ] || { echo 'gone - 0'; exit 0; }
p=$(cat -- "$D/pid" 2>/dev/null)
if [ -e "$D/rc" ]; then st="exited $(cat -- "$D/rc")"
elif [ -n "$p" ] && kill -0 -- "-$p" 2>/dev/null; then st='running -'
else st='killed -'; fi
size=$(stat -c %s -- "$D/out" 2>/dev/null || echo 0)
printf '%s %s\n' "$st" "$size"
ports=
[ "$st" = 'running -' ] && ports=$(listening "$p")
printf 'ports %s\n' "$ports"
tail -c "+$(($3 + 1))" -- "$D/out" 2>/dev/null | head -c "$4" | base64 -w0
echo
"""

# check ID...: per process "<id> <status> <rc> <ports>" (status: running, exited, killed, gone;
# ports: comma-separated, '-' for none).
CHECK = r"""
dir=$1; shift
for id in "$@"; do
  D=$dir/$id; p=$(cat -- "$D/pid" 2>/dev/null)
  if [ ! -d "$D" ]; then echo "$id gone - -"
  elif [ -e "$D/rc" ]; then echo "$id exited $(cat -- "$D/rc") -"
  elif [ -n "$p" ] && kill -0 -- "-$p" 2>/dev/null; then
    ports=$(listening "$p" | tr -s ' ' ','); ports=${ports%,}; echo "$id running - ${ports:--}"
  else echo "$id killed - -"; fi
done
"""

# stop GRACE ID...: SIGTERM each live one's group, SIGKILL after GRACE seconds; then per process
# "<id> <status> <rc>" (status: exited, killed, gone).
STOP = r"""
dir=$1; grace=$2; shift 2
live=()
for id in "$@"; do
  D=$dir/$id; p=$(cat -- "$D/pid" 2>/dev/null) || continue
  [ -e "$D/rc" ] && continue
  kill -TERM -- "-$p" 2>/dev/null && live+=("$p")
done
i=0
while [ "${#live[@]}" -gt 0 ] && [ "$i" -lt $((grace * 20)) ]; do
  left=(); for p in "${live[@]}"; do kill -0 -- "-$p" 2>/dev/null && left+=("$p"); done
  live=("${left[@]}"); [ "${#live[@]}" -gt 0 ] && sleep 0.05; i=$((i + 1))
done
for p in "${live[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
for id in "$@"; do
  D=$dir/$id
  if [ ! -d "$D" ]; then echo "$id gone -"
  elif [ -e "$D/rc" ]; then echo "$id exited $(cat -- "$D/rc")"
  else echo "$id killed -"; fi
done
"""


def script(body: str, *args: str) -> str:
    """``body`` as a ``bash -c`` command line with positional arguments (every one quoted,
    the process directory left as the machine gives it: a shell word)."""
    return " ".join(["bash", "-c", shlex.quote(body), "kiln", *args])
