#!/usr/bin/env bash
# A local 3-node lockd cluster for development and benchmarks.
#
#   scripts/dev-cluster.sh start [--release]   start the nodes that are not running, then wait
#                                              (bounded) until every running node sees one leader
#   scripts/dev-cluster.sh status [--release]  each node's pid and view, then `lockctl cluster status`
#   scripts/dev-cluster.sh stop                SIGTERM, then SIGKILL after a bounded wait
#
# Node N (1-3) serves clients on 127.0.0.1:700N and peers on 127.0.0.1:710N (the bases 7000
# and 7100 can be moved with LOCKD_DEV_CLIENT_BASE and LOCKD_DEV_PEER_BASE); its data is in
# $LOCKD_DEV_DIR/nN (default: .dev-cluster/nN at the repository root), its log in nN.log and
# its pid in nN.pid there. Missing binaries are built (cargo build [--release] -p lockd-server
# -p lockd-client); existing ones are used as they are. Every command is idempotent.
#
# Environment: LOCKD_DEV_DIR (data directory), LOCKD_DEV_ARGS (extra lockd flags, e.g.
# "--spin-us 0 --max-connections 20000"), LOCKD_DEV_BIN (a directory with lockd and lockctl
# to use instead of target/debug or target/release; nothing is built), LOCKD_DEV_WAIT
# (seconds `start` waits for a leader, default 30), LOCKD_DEV_STOP_WAIT (seconds `stop`
# waits after SIGTERM, default 10).
set -euo pipefail

NODES=(1 2 3)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${LOCKD_DEV_DIR:-$ROOT/.dev-cluster}
WAIT=${LOCKD_DEV_WAIT:-30}
STOP_WAIT=${LOCKD_DEV_STOP_WAIT:-10}
CLIENT_BASE=${LOCKD_DEV_CLIENT_BASE:-7000}
PEER_BASE=${LOCKD_DEV_PEER_BASE:-7100}

usage() {
    sed -n '2,/^[^#]/{/^#/p;}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
    echo "dev-cluster: $*" >&2
    exit 1
}

client_addr() { echo "127.0.0.1:$((CLIENT_BASE + $1))"; }
peer_addr() { echo "127.0.0.1:$((PEER_BASE + $1))"; }
pid_file() { echo "$DIR/n$1.pid"; }
log_file() { echo "$DIR/n$1.log"; }

# The pid of node $1 if it is running (a live lockd process with this node's data
# directory; a stale pid file or a reused pid does not count), else nothing.
node_pid() {
    local file pid cmdline
    file=$(pid_file "$1")
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" || true)
    if [[ $cmdline == *lockd*"--data-dir $DIR/n$1 "* ]]; then
        echo "$pid"
    fi
}

ensure_binaries() {
    local missing=0 bin
    for bin in "$LOCKD" "$LOCKCTL"; do
        [[ -x $bin ]] || missing=1
    done
    if ((missing)) && [[ -n ${LOCKD_DEV_BIN:-} ]]; then
        die "LOCKD_DEV_BIN=$LOCKD_DEV_BIN has no lockd and lockctl"
    fi
    if ((missing)); then
        echo "dev-cluster: building ($PROFILE)" >&2
        (cd "$ROOT" && cargo build "${CARGO_FLAGS[@]}" -p lockd-server -p lockd-client)
    fi
}

# Prints `cluster status` as node $1 sees it (only that node is asked), or fails.
node_view() {
    "$LOCKCTL" --endpoints "$(client_addr "$1")" --timeout 2 cluster status 2>/dev/null
}

# Prints the leader id if every running node answers and reports the same leader.
agreed_leader() {
    local n pid view leader agreed=""
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n")
        [[ -n $pid ]] || continue
        view=$(node_view "$n") || return 1
        leader=$(awk '$1 == "leader" && $2 ~ /^[0-9]+$/ { print $2 }' <<<"$view")
        [[ -n $leader ]] || return 1
        [[ -z $agreed || $agreed == "$leader" ]] || return 1
        agreed=$leader
    done
    [[ -n $agreed ]] || return 1
    echo "$agreed"
}

cmd_start() {
    local n pid extra=() started=0
    ensure_binaries
    mkdir -p "$DIR"
    [[ -e $DIR/.gitignore ]] || echo '*' >"$DIR/.gitignore"
    if [[ -n ${LOCKD_DEV_ARGS:-} ]]; then
        read -r -a extra <<<"$LOCKD_DEV_ARGS"
    fi
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n")
        if [[ -n $pid ]]; then
            echo "n$n already running (pid $pid)"
            continue
        fi
        mkdir -p "$DIR/n$n"
        NO_COLOR=${NO_COLOR:-1} nohup "$LOCKD" --id "$n" --data-dir "$DIR/n$n" \
            --client-addr "$(client_addr "$n")" --peer-addr "$(peer_addr "$n")" \
            --peers "$PEERS" "${extra[@]}" >>"$(log_file "$n")" 2>&1 </dev/null &
        echo $! >"$(pid_file "$n")"
        echo "n$n started (pid $!, clients $(client_addr "$n"), log $(log_file "$n"))"
        started=1
    done
    local deadline=$((SECONDS + WAIT)) leader
    while true; do
        for n in "${NODES[@]}"; do
            if ((started)) && [[ -f $(pid_file "$n") && -z $(node_pid "$n") ]]; then
                echo "dev-cluster: n$n exited; the end of $(log_file "$n"):" >&2
                tail -n 20 "$(log_file "$n")" >&2 || true
                exit 1
            fi
        done
        if leader=$(agreed_leader); then
            echo "leader: n$leader ($(client_addr "$leader"))"
            return 0
        fi
        ((SECONDS < deadline)) || die "no leader after ${WAIT}s (logs in $DIR)"
        sleep 0.2
    done
}

cmd_status() {
    local n pid view leader term commit running=0
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n")
        if [[ -z $pid ]]; then
            printf 'n%s  %-15s  pid %-8s  %s\n' "$n" "$(client_addr "$n")" "-" "not running"
            continue
        fi
        running=1
        if view=$(node_view "$n"); then
            leader=$(awk '$1 == "leader" { print $2 }' <<<"$view")
            term=$(awk '$1 == "term" { print $2 }' <<<"$view")
            commit=$(awk '$1 == "commit" { print $2 }' <<<"$view")
            printf 'n%s  %-15s  pid %-8s  alive  sees leader %s, term %s, commit %s\n' \
                "$n" "$(client_addr "$n")" "$pid" "$leader" "$term" "$commit"
        else
            printf 'n%s  %-15s  pid %-8s  alive  (not answering)\n' "$n" "$(client_addr "$n")" "$pid"
        fi
    done
    ((running)) || {
        echo "cluster: not running"
        return 1
    }
    echo
    "$LOCKCTL" --endpoints "$ENDPOINTS" --timeout 3 cluster status || {
        echo "cluster status: no answer"
        return 1
    }
}

cmd_stop() {
    local n pid pids=() nodes=()
    for n in "${NODES[@]}"; do
        pid=$(node_pid "$n")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            nodes+=("$n")
            echo "n$n: SIGTERM (pid $pid)"
        else
            echo "n$n: not running"
            rm -f "$(pid_file "$n")"
        fi
    done
    local deadline=$((SECONDS + STOP_WAIT)) i alive
    while true; do
        alive=0
        for i in "${!pids[@]}"; do
            if [[ -n $(node_pid "${nodes[$i]}") ]]; then
                alive=1
            fi
        done
        ((alive && SECONDS < deadline)) || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if [[ -n $(node_pid "${nodes[$i]}") ]]; then
            echo "n${nodes[$i]}: still running after ${STOP_WAIT}s, SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
        rm -f "$(pid_file "${nodes[$i]}")"
    done
}

[[ $# -ge 1 ]] || {
    usage >&2
    exit 2
}
COMMAND=$1
shift
PROFILE=debug
CARGO_FLAGS=()
for arg in "$@"; do
    case $arg in
    --release)
        PROFILE=release
        CARGO_FLAGS=(--release)
        ;;
    *) die "unknown argument: $arg (try --help)" ;;
    esac
done
case $DIR in
/*) ;;
*) DIR=$PWD/$DIR ;;
esac
[[ $CLIENT_BASE =~ ^[0-9]+$ && $PEER_BASE =~ ^[0-9]+$ ]] ||
    die "LOCKD_DEV_CLIENT_BASE and LOCKD_DEV_PEER_BASE must be port numbers"
PEERS=""
ENDPOINTS=""
for n in "${NODES[@]}"; do
    PEERS+="${PEERS:+,}$n=$(peer_addr "$n")"
    ENDPOINTS+="${ENDPOINTS:+,}$(client_addr "$n")"
done
BIN=${LOCKD_DEV_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE}
LOCKD=$BIN/lockd
LOCKCTL=$BIN/lockctl

case $COMMAND in
start) cmd_start ;;
status)
    [[ -x $LOCKCTL ]] || die "$LOCKCTL is missing (run start first, with the same --release)"
    cmd_status
    ;;
stop) cmd_stop ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
