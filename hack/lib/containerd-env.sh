# shellcheck shell=bash
# A private, throw-away containerd (1.6 or 2.1) next to a private
# kuasar-sandboxer, everything under one directory DIR. Sourced by
# hack/setup.sh, hack/up.sh and hack/down.sh; usable from any bash script.
# It never touches a system containerd: own root, state, sockets and opt
# dir, and nothing it starts uses /run/containerd or /var/lib/containerd
# (see kuasar_env_run_flags for ctr's own defaults). ctr's default namespace
# in an env is the env's own (KUASAR_ENV_NAMESPACE), so containers get the
# cgroup /<that namespace>/<id>: two envs (or an env and a system
# containerd) never share a container cgroup, even for equal ids.
#
#   kuasar_env_up VERSION DIR     start containerd VERSION (1.6 | 2.1) and a
#                                 kuasar-sandboxer under DIR (absolute, short)
#   kuasar_env_down DIR           stop everything the env started, kill what
#                                 its containers left, unmount, remove DIR
#   kuasar_env_load DIR           set the variables below for an env that is
#                                 already up (another shell, hack/down.sh)
#   kuasar_env_is_up DIR          true if DIR holds an env whose containerd runs
#   kuasar_ctr ARGS...            ctr of the env's version against its socket
#   kuasar_env_run_flags [RUNTIME]
#                                 sets the array KUASAR_RUN_FLAGS: flags for
#                                 `ctr run` keeping ctr's FIFOs (and, for
#                                 runc.v2, runc's state) in DIR
#   kuasar_env_shims DIR          prints "PID CMDLINE" of every live
#                                 containerd-shim-kuasar* process of the env
#   kuasar_env_shim_pids DIR [GLOB]
#                                 prints the pids of the env's live shim
#                                 processes (any containerd-shim*, or GLOB)
#
# After kuasar_env_up / kuasar_env_load:
#   KUASAR_ENV_DIR                DIR
#   KUASAR_ENV_VERSION            1.6 | 2.1
#   KUASAR_ENV_CONTAINERD_DIR     where containerd, ctr, containerd-shim-runc-v2 are
#   KUASAR_ENV_ADDRESS            containerd's gRPC socket, DIR/c.sock
#   KUASAR_ENV_SANDBOXER_SOCKET   the sandboxer's private socket, DIR/k/s.sock
#                                 (given to containerd as KUASAR_SANDBOXER_SOCKET)
#   KUASAR_ENV_NAMESPACE          ctr's default namespace in the env (DIR's
#                                 name + a hash of DIR, e.g.
#                                 kuasar-up-1.6-1a2b3c4d); `ctr -n X` still
#                                 picks another one
#   KUASAR_CTR                    array, the ctr command line for the env:
#                                 env CONTAINERD_NAMESPACE=NS CTR --address DIR/c.sock
#                                 e.g. "${KUASAR_CTR[@]}" image ls
#   DIR/ctr                       the same as a script, for other shells
#   DIR/containerd.log, DIR/sandboxer.log, DIR/containerd.pid, DIR/sandboxer.pid
#
# Inputs: KUASAR_BIN_DIR (kuasar binaries, default <repo>/target/release),
# KUASAR_CONTAINERD2_DIR (containerd 2.1, default
# /opt/kuasar-deps/containerd-2/usr/bin), KUASAR_SANDBOXER_LOG (log_level,
# default info).

KUASAR_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUASAR_BIN=${KUASAR_BIN_DIR:-$KUASAR_REPO/target/release}
KUASAR_CONTAINERD2_DIR=${KUASAR_CONTAINERD2_DIR:-/opt/kuasar-deps/containerd-2/usr/bin}
# DIR is the prefix of every unix socket of the env; the longest is the
# sandboxer's DIR/k/t/<16 hex>.sock (DIR + 25 bytes) and sun_path holds 107.
KUASAR_ENV_MAX_DIR_LEN=80
# Marks a directory as an env, so kuasar_env_down never removes anything else.
KUASAR_ENV_MARKER=.kuasar-env

_kuasar_err() { echo "containerd-env: $*" >&2; }

_kuasar_containerd_dir() {
  case "$1" in
    1.6) echo /usr/bin ;;
    2.1) echo "$KUASAR_CONTAINERD2_DIR" ;;
    *) _kuasar_err "unknown containerd version '$1' (1.6 or 2.1)"; return 1 ;;
  esac
}

# Refuses directories that could hit something that is not ours.
_kuasar_check_dir() {
  local dir=$1
  case "$dir" in
    /*) ;;
    *) _kuasar_err "DIR must be absolute: '$dir'"; return 1 ;;
  esac
  if [[ $dir =~ [[:space:]] || $dir == */ || $dir == *//* || $dir == */./* || $dir == */../* || $dir == */. || $dir == */.. ]]; then
    _kuasar_err "DIR must be a plain path without spaces or trailing '/': '$dir'"; return 1
  fi
  case "$dir" in
    / | /run | /var | /var/run | /var/lib | /tmp | /opt | /etc | /usr | /home | /root | \
    /run/containerd | /run/containerd/* | /var/run/containerd | /var/run/containerd/* | \
    /var/lib/containerd | /var/lib/containerd/* | /run/kuasar | /run/kuasar/*)
      _kuasar_err "refusing DIR '$dir'"; return 1 ;;
  esac
  if [ ${#dir} -gt $KUASAR_ENV_MAX_DIR_LEN ]; then
    _kuasar_err "DIR '$dir' is too long for unix socket paths (max $KUASAR_ENV_MAX_DIR_LEN bytes)"; return 1
  fi
}

# The argv of process PID into the array _KUASAR_ARGV (empty if it is gone).
_kuasar_argv() {
  _KUASAR_ARGV=()
  [ -r "/proc/$1/cmdline" ] || return 1
  mapfile -d '' -t _KUASAR_ARGV < "/proc/$1/cmdline" 2>/dev/null || return 1
  [ ${#_KUASAR_ARGV[@]} -gt 0 ]
}

# Whether process PID runs with argument ARG (an exact argv element): pid
# files can be stale and pids reused, so nothing is killed on a pid alone.
_kuasar_pid_has_arg() {
  local a
  _kuasar_argv "$1" || return 1
  for a in "${_KUASAR_ARGV[@]:1}"; do
    [ "$a" = "$2" ] && return 0
  done
  return 1
}

# PID of the process whose argv[0] is BIN and that has argument ARG.
_kuasar_find_pid() {
  local bin=$1 arg=$2 p
  for p in /proc/[0-9]*; do
    _kuasar_argv "${p#/proc/}" || continue
    [ "${_KUASAR_ARGV[0]}" = "$bin" ] || continue
    _kuasar_pid_has_arg "${p#/proc/}" "$arg" && { echo "${p#/proc/}"; return 0; }
  done
  return 1
}

# Pids of every containerd-shim* process (kuasar or runc-v2) whose command
# line has DIR/c.sock as an argument (containerd passes it as -address).
# PATTERN (default containerd-shim*) narrows the binary name.
kuasar_env_shim_pids() {
  local dir=$1 pattern=${2:-containerd-shim*} p
  for p in /proc/[0-9]*; do
    _kuasar_argv "${p#/proc/}" || continue
    # shellcheck disable=SC2053 # pattern match intended
    [[ ${_KUASAR_ARGV[0]##*/} == $pattern ]] || continue
    _kuasar_pid_has_arg "${p#/proc/}" "$dir/c.sock" && echo "${p#/proc/}"
  done
  return 0
}

kuasar_env_shims() {
  local dir=${1:-${KUASAR_ENV_DIR:-}} pid
  for pid in $(kuasar_env_shim_pids "$dir" 'containerd-shim-kuasar*'); do
    _kuasar_argv "$pid" && echo "$pid ${_KUASAR_ARGV[*]}"
  done
  return 0
}

# The env's containerd namespace: DIR's name made a valid namespace
# ([A-Za-z0-9]+ joined by single . _ -), prefixed kuasar- unless it has it,
# plus a hash of the whole path so that envs in different directories of the
# same name still get different namespaces (and cgroup parents).
_kuasar_namespace_for() {
  local name hash
  name=$(basename -- "$1" | sed -E 's/[^A-Za-z0-9._-]+/-/g; s/[._-]{2,}/-/g; s/^[._-]+//; s/[._-]+$//')
  case "$name" in kuasar*) ;; *) name=kuasar${name:+-$name} ;; esac
  name=$(echo "${name:0:50}" | sed -E 's/[._-]+$//')
  hash=$(printf '%s' "$1" | sha256sum | cut -c1-8)
  echo "$name-$hash"
}

kuasar_env_load() {
  local dir=$1 ver
  _kuasar_check_dir "$dir" || return 1
  [ -f "$dir/$KUASAR_ENV_MARKER" ] || { _kuasar_err "$dir is not a kuasar env"; return 1; }
  ver=$(sed -n 's/^version=//p' "$dir/$KUASAR_ENV_MARKER")
  # shellcheck disable=SC2034 # set for the callers
  KUASAR_ENV_DIR=$dir
  # shellcheck disable=SC2034
  KUASAR_ENV_VERSION=$ver
  KUASAR_ENV_CONTAINERD_DIR=$(_kuasar_containerd_dir "$ver") || return 1
  KUASAR_ENV_ADDRESS=$dir/c.sock
  # shellcheck disable=SC2034
  KUASAR_ENV_SANDBOXER_SOCKET=$dir/k/s.sock
  KUASAR_ENV_NAMESPACE=$(sed -n 's/^namespace=//p' "$dir/$KUASAR_ENV_MARKER")
  # The namespace goes in the environment: a second --namespace/-n flag
  # would make ctr refuse the command line.
  KUASAR_CTR=(env "CONTAINERD_NAMESPACE=$KUASAR_ENV_NAMESPACE" "$KUASAR_ENV_CONTAINERD_DIR/ctr" --address "$KUASAR_ENV_ADDRESS")
}

kuasar_env_is_up() {
  local dir=$1 pid
  [ -f "$dir/$KUASAR_ENV_MARKER" ] || return 1
  pid=$(cat "$dir/containerd.pid" 2>/dev/null || true)
  [ -n "$pid" ] && _kuasar_pid_has_arg "$pid" "$dir/containerd.toml"
}

kuasar_ctr() {
  [ -n "${KUASAR_CTR+x}" ] || { _kuasar_err "no env loaded"; return 1; }
  "${KUASAR_CTR[@]}" "$@"
}

# ctr puts client FIFOs in /run/containerd/fifo and containerd-shim-runc-v2
# keeps runc's state in /run/containerd/runc/<namespace> unless told
# otherwise; these flags keep both in the env. (The runc.v2 shim's own
# socket, /run/containerd/s/<hash>, cannot be moved.)
kuasar_env_run_flags() {
  local runtime=${1:-io.containerd.kuasarrunc.v1}
  [ -n "${KUASAR_ENV_DIR:-}" ] || { _kuasar_err "no env loaded"; return 1; }
  KUASAR_RUN_FLAGS=(--fifo-dir "$KUASAR_ENV_DIR/fifo")
  case "$runtime" in
    io.containerd.kuasar*) ;;
    *) KUASAR_RUN_FLAGS+=(--runc-root "$KUASAR_ENV_DIR/runc-v2") ;;
  esac
}

# Waits up to SECONDS for COMMAND to succeed while process PID lives.
_kuasar_wait() {
  local secs=$1 pid=$2 i
  shift 2
  for ((i = 0; i < secs * 20; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Whether a unix socket accepts connections (a socket file alone may be stale).
_kuasar_socket_listens() {
  [ -S "$1" ] || return 1
  command -v python3 >/dev/null || return 0
  python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect(sys.argv[1])' "$1"
}

_kuasar_write_containerd_config() {
  local ver=$1 dir=$2
  if [ "$ver" = 1.6 ]; then
    cat > "$dir/containerd.toml" <<EOT
# containerd 1.6 of the throw-away env in $dir (written by hack/lib/containerd-env.sh)
version = 2
root = "$dir/root"
state = "$dir/state"
# ctr-only env: no CRI, so startup stays fast.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
EOT
  else
    cat > "$dir/containerd.toml" <<EOT
# containerd 2.1 of the throw-away env in $dir (written by hack/lib/containerd-env.sh)
version = 3
root = "$dir/root"
state = "$dir/state"
# ctr-only env: no CRI (and no NRI, whose socket is machine-wide), so startup
# stays fast and nothing outside $dir is used.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$dir/opt"
EOT
  fi
}

_kuasar_log_tails() {
  local dir=$1 f
  for f in containerd.log sandboxer.log; do
    [ -f "$dir/$f" ] || continue
    echo "--- $dir/$f (tail) ---" >&2
    tail -n 20 "$dir/$f" >&2
  done
}

kuasar_env_up() {
  local ver=${1:-} dir=${2:-} cdir b pid
  if [ -z "$ver" ] || [ -z "$dir" ]; then _kuasar_err "usage: kuasar_env_up 1.6|2.1 DIR"; return 1; fi
  _kuasar_check_dir "$dir" || return 1
  cdir=$(_kuasar_containerd_dir "$ver") || return 1
  for b in "$cdir/containerd" "$cdir/ctr" "$cdir/containerd-shim-runc-v2"; do
    [ -x "$b" ] || { _kuasar_err "$b missing: run hack/install-deps.sh"; return 1; }
  done
  for b in kuasar-sandboxer containerd-shim-kuasarrunc-v1 containerd-shim-kuasarwasm-v1 containerd-shim-kuasarvmm-v1; do
    [ -x "$KUASAR_BIN/$b" ] || { _kuasar_err "$KUASAR_BIN/$b missing: cargo build --release --workspace"; return 1; }
  done
  command -v runc >/dev/null || { _kuasar_err "runc missing: run hack/install-deps.sh"; return 1; }
  # containerd resolves the shims through PATH from its own cwd: absolute only.
  KUASAR_BIN=$(cd "$KUASAR_BIN" && pwd)

  if [ -e "$dir" ]; then
    if [ -f "$dir/$KUASAR_ENV_MARKER" ]; then
      if kuasar_env_is_up "$dir"; then
        _kuasar_err "an env is already up in $dir"; return 1
      fi
      # Leftovers of an env that was not taken down (crash, reboot).
      kuasar_env_down "$dir" || return 1
    elif [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
      _kuasar_err "$dir exists and is not an env: refusing to use it"; return 1
    fi
  fi

  mkdir -p "$dir"
  printf 'version=%s\nnamespace=%s\n' "$ver" "$(_kuasar_namespace_for "$dir")" > "$dir/$KUASAR_ENV_MARKER"
  kuasar_env_load "$dir" || return 1
  mkdir -p "$dir/state" "$dir/k" "$dir/fifo"
  # containerd's state (bundles, rootfs mounts) and the sandboxer's root on
  # tmpfs, as /run/containerd and /run/kuasar are on a node.
  mountpoint -q "$dir/state" || mount -t tmpfs -o mode=0711 tmpfs "$dir/state" || return 1
  mountpoint -q "$dir/k" || mount -t tmpfs -o mode=0711 tmpfs "$dir/k" || return 1

  _kuasar_write_containerd_config "$ver" "$dir"
  cat > "$dir/sandboxer.toml" <<EOT
# kuasar-sandboxer of the throw-away env in $dir (root and listen come from
# the command line)
log_level = "${KUASAR_SANDBOXER_LOG:-info}"
[runc]
enabled = true
binary = "runc"
[wasm]
enabled = true
EOT
  # microVMs, when the guest image was built (hack/build-guest-image.sh).
  local guest=${KUASAR_GUEST_DIR:-$PWD/target/kuasar-guest}
  if [ -f "$guest/vmlinux" ]; then
    cat >> "$dir/sandboxer.toml" <<EOT
[vmm]
enabled = true
kernel = "$guest/vmlinux"
initrd = "$guest/initramfs.cpio"
accel = "${KUASAR_VMM_ACCEL:-auto}"
EOT
  else
    printf '[vmm]\nenabled = false\n' >> "$dir/sandboxer.toml"
  fi
  printf '#!/bin/sh\n# ctr for the throw-away containerd %s in %s\nCONTAINERD_NAMESPACE=%q\nexport CONTAINERD_NAMESPACE\nexec %q --address %q "$@"\n' \
    "$ver" "$dir" "$KUASAR_ENV_NAMESPACE" "$cdir/ctr" "$dir/c.sock" > "$dir/ctr"
  chmod 0755 "$dir/ctr"

  # Own sessions (setsid): the daemons outlive the caller's terminal
  # (hack/up.sh) and a ^C in it; pids are found by their command lines.
  setsid "$KUASAR_BIN/kuasar-sandboxer" --root "$dir/k" --listen "$dir/k/s.sock" \
    --config "$dir/sandboxer.toml" </dev/null >>"$dir/sandboxer.log" 2>&1 &
  # Not the caller's job: no "Killed" notice from bash when it is stopped.
  disown $! 2>/dev/null || true
  pid=$(_kuasar_wait_pid "$KUASAR_BIN/kuasar-sandboxer" "$dir/sandboxer.toml") || {
    _kuasar_err "kuasar-sandboxer did not start"; _kuasar_log_tails "$dir"; return 1; }
  echo "$pid" > "$dir/sandboxer.pid"
  _kuasar_wait 10 "$pid" _kuasar_socket_listens "$dir/k/s.sock" || {
    _kuasar_err "kuasar-sandboxer did not come up"; _kuasar_log_tails "$dir"; return 1; }

  # containerd finds the kuasar shims (and its own containerd-shim-runc-v2)
  # in its PATH and passes its environment, KUASAR_SANDBOXER_SOCKET included,
  # to every shim it starts.
  KUASAR_SANDBOXER_SOCKET="$dir/k/s.sock" PATH="$KUASAR_BIN:$cdir:$PATH" \
    setsid "$cdir/containerd" --config "$dir/containerd.toml" </dev/null >>"$dir/containerd.log" 2>&1 &
  disown $! 2>/dev/null || true
  pid=$(_kuasar_wait_pid "$cdir/containerd" "$dir/containerd.toml") || {
    _kuasar_err "containerd did not start"; _kuasar_log_tails "$dir"; return 1; }
  echo "$pid" > "$dir/containerd.pid"
  _kuasar_wait 20 "$pid" timeout 2 "${KUASAR_CTR[@]}" version || {
    _kuasar_err "containerd $ver did not come up"; _kuasar_log_tails "$dir"; return 1; }
}

# Waits up to 5 s for the process BIN ... ARG to exist; prints its pid.
_kuasar_wait_pid() {
  local i
  for ((i = 0; i < 100; i++)); do
    _kuasar_find_pid "$1" "$2" && return 0
    sleep 0.05
  done
  return 1
}

# Stops the process in PIDFILE if it still is the one (has argument ARG):
# SIGTERM, then SIGKILL after GRACE seconds.
_kuasar_stop_pidfile() {
  local f=$1 arg=$2 grace=$3 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && _kuasar_pid_has_arg "$pid" "$arg"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 20; i++)); do
      _kuasar_pid_has_arg "$pid" "$arg" || break
      sleep 0.05
    done
    if _kuasar_pid_has_arg "$pid" "$arg"; then
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 100; i++)); do _kuasar_pid_has_arg "$pid" "$arg" || break; sleep 0.05; done
    fi
  fi
  rm -f "$f"
}

# Thaws, kills and removes cgroup NAME (and below) in every hierarchy.
_kuasar_destroy_cgroup() {
  local name=$1 d c i pids
  local -a dirs=()
  [ -n "$name" ] || return 0
  if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    [ -d "/sys/fs/cgroup/$name" ] && dirs+=("/sys/fs/cgroup/$name")
  else
    # cgroup v1 (+ the hybrid unified tree); skip cpu -> cpu,cpuacct links.
    for d in /sys/fs/cgroup/*/"$name"; do
      if [ -d "$d" ] && [ ! -L "${d%/*}" ]; then dirs+=("$d"); fi
    done
  fi
  [ ${#dirs[@]} -gt 0 ] || return 0
  # A frozen process only dies of SIGKILL once thawed.
  while read -r c; do
    if [ -w "$c/freezer.state" ]; then echo THAWED > "$c/freezer.state" 2>/dev/null || true; fi
    if [ -w "$c/cgroup.freeze" ]; then echo 0 > "$c/cgroup.freeze" 2>/dev/null || true; fi
  done < <(find "${dirs[@]}" -type d 2>/dev/null)
  for ((i = 0; i < 100; i++)); do
    pids=$(find "${dirs[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)
    [ -n "$pids" ] || break
    # shellcheck disable=SC2086 # one pid a word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.05
  done
  find "${dirs[@]}" -depth -type d -exec rmdir {} + 2>/dev/null || true
}

# Force-deletes the runc containers of one runc root (a namespace dir).
# ONLY_BUNDLE set: only those whose bundle lies in that directory.
_kuasar_runc_delete_all() {
  local root=$1 only=${2:-} id
  [ -d "$root" ] || return 0
  for id in $(timeout 10 runc --root "$root" list -q 2>/dev/null); do
    if [ -n "$only" ]; then
      grep -qF "\"bundle=$only/" "$root/$id/state.json" 2>/dev/null || continue
    fi
    timeout 10 runc --root "$root" delete --force "$id" >/dev/null 2>&1 || true
  done
}

# Mount points at or below DIR, deepest (and latest) first.
_kuasar_mounts_under() {
  local dir=$1
  # Field 5 is the mount point, with space, tab, newline and '\' as octal.
  awk -v d="$dir" '{ m = $5; gsub(/\\040/, " ", m); gsub(/\\011/, "\t", m);
                     gsub(/\\012/, "\n", m); gsub(/\\134/, "\\", m);
                     if (m == d || index(m, d "/") == 1) print NR "\t" m }' /proc/self/mountinfo |
    sort -t "$(printf '\t')" -k1,1nr | cut -f2-
}

kuasar_env_down() {
  local dir=${1:-} ver cdir envns ns id pid m i deadline
  local -a ctr mounts
  [ -n "$dir" ] || { _kuasar_err "usage: kuasar_env_down DIR"; return 1; }
  _kuasar_check_dir "$dir" || return 1
  [ -e "$dir" ] || return 0
  if [ ! -f "$dir/$KUASAR_ENV_MARKER" ]; then
    # Only an empty directory (an env that failed before its marker) goes.
    rmdir "$dir" 2>/dev/null && return 0
    _kuasar_err "$dir is not a kuasar env (no $KUASAR_ENV_MARKER): not touching it"; return 1
  fi
  ver=$(sed -n 's/^version=//p' "$dir/$KUASAR_ENV_MARKER")
  envns=$(sed -n 's/^namespace=//p' "$dir/$KUASAR_ENV_MARKER")
  cdir=$(_kuasar_containerd_dir "$ver" 2>/dev/null) || cdir=/usr/bin
  ctr=("$cdir/ctr" --address "$dir/c.sock")

  # 1. While containerd answers, remove the tasks the normal way (this also
  #    cleans runc.v2 state kept outside DIR), bounded in time.
  pid=$(cat "$dir/containerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && _kuasar_pid_has_arg "$pid" "$dir/containerd.toml" &&
     timeout 2 "${ctr[@]}" version >/dev/null 2>&1; then
    deadline=$((SECONDS + 20))
    for ns in $(timeout 5 "${ctr[@]}" namespaces ls -q 2>/dev/null); do
      for id in $(timeout 5 "${ctr[@]}" -n "$ns" tasks ls -q 2>/dev/null); do
        [ $SECONDS -lt $deadline ] || break 2
        timeout 10 "${ctr[@]}" -n "$ns" tasks delete --force "$id" >/dev/null 2>&1 || true
      done
    done
  fi

  # 2. containerd.
  _kuasar_stop_pidfile "$dir/containerd.pid" "$dir/containerd.toml" 10

  # 3. Containers outlive both daemons: force-delete what runc still knows
  #    (the sandboxer's runc root, `ctr run --runc-root DIR/runc-v2`, and
  #    runc.v2 containers of this env kept in runc's default root).
  for ns in "$dir"/k/runc/*/ "$dir"/runc-v2/*/; do
    [ -d "$ns" ] && _kuasar_runc_delete_all "${ns%/}"
  done
  for ns in /run/containerd/runc/*/; do
    [ -d "$ns" ] && _kuasar_runc_delete_all "${ns%/}" "$dir"
  done
  # runc leaves its (now empty) directory for the env's own namespace.
  [ -z "$envns" ] || rmdir "/run/containerd/runc/$envns" 2>/dev/null || true
  # Whatever still runs in the env namespace's cgroup parent (also frozen
  # tasks): ctr's default cgroup for a container is /<namespace>/<id>.
  _kuasar_destroy_cgroup "$envns"

  # 4. The sandboxer, then any shim of this env that is still around
  #    (containerd-shim-runc-v2 lives as long as its container).
  _kuasar_stop_pidfile "$dir/sandboxer.pid" "$dir/sandboxer.toml" 5
  for pid in $(kuasar_env_shim_pids "$dir"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # VMs outlive the sandboxer as containers do.
  for pid in $(pgrep -f "qemu-system.*$dir/" 2>/dev/null); do
    kill -KILL "$pid" 2>/dev/null || true
  done

  # 5. Unmount everything below DIR (rootfs overlays, the tmpfs), deepest
  #    first; lazily if busy.
  for ((i = 0; i < 10; i++)); do
    mapfile -t mounts < <(_kuasar_mounts_under "$dir")
    [ ${#mounts[@]} -gt 0 ] || break
    for m in "${mounts[@]}"; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  if [ -n "$(_kuasar_mounts_under "$dir")" ]; then
    _kuasar_err "could not unmount everything under $dir:"; _kuasar_mounts_under "$dir" >&2
    return 1
  fi
  # --one-file-system: never descend into anything still mounted.
  rm -rf --one-file-system -- "$dir"
  [ ! -e "$dir" ] || { _kuasar_err "could not remove $dir"; return 1; }
  if [ "${KUASAR_ENV_DIR:-}" = "$dir" ]; then
    unset KUASAR_ENV_DIR KUASAR_ENV_VERSION KUASAR_ENV_CONTAINERD_DIR KUASAR_ENV_ADDRESS \
      KUASAR_ENV_SANDBOXER_SOCKET KUASAR_ENV_NAMESPACE KUASAR_CTR
  fi
  return 0
}
