#!/bin/sh
# fbg-workload, the guest disk's /usr/bin/fbg-workload: writes files into the disk's file system without end
# and keeps a checksum log, so that a restored copy of the disk can be checked. Run it through the guest
# agent (guest-exec), or the serial console's workload command (build-kit.sh).
#
#   fbg-workload start [KIB]  Starts writing in the background: /data/file-N, KIB KiB (default 64) of random
#                             bytes each, N counting on from the log's length. Prints "started".
#   fbg-workload stop         Lets the file being written finish, then stops. Prints "stopped N": N files logged.
#   fbg-workload status       "running N", "stopped N", or "failed N: WHY" (a write failed: the disk holds
#                             about 2800 files of 64 KiB, some 5 minutes of writing under TCG).
#   fbg-workload wait N       Waits until N files are logged: prints "logged M" (M >= N). Exits 1 if the
#                             writing stops first, or after 60 s.
#   fbg-workload verify       Checks every logged file: prints "verified N", or the files that differ and
#                             exits 1.
#
# A file gets its log line only once it and its directory entry are on the disk (fsync), and the log is
# fsync'd after each line. So in any crash-consistent copy of the disk, every complete line of
# /data/checksums.log names a file that has exactly that sha256. A line is `sha256sum` output
# ("HASH  /data/file-N"): `sha256sum -c` reads the log as it is. Only a last line without its newline
# can be torn in such a copy; verify leaves it out.
set -u

data=/data
log=$data/checksums.log
state=/run/fbg-workload  # markers in the tmpfs, never in the file system that a freeze holds still

logged() {
    if [ -f "$log" ]; then grep -c '^' "$log"; else echo 0; fi
}

# The background writer ("fbg-workload run KIB"); it removes $state.running when it ends.
write_files() {
    index=$(logged)
    while [ ! -e "$state.stop" ]; do
        file=$data/file-$index
        if ! head -c "$(($1 * 1024))" /dev/urandom >"$file" || ! sync "$file" "$data"; then
            echo "writing $file failed" >"$state.failed"
            break
        fi
        if ! sha256sum "$file" >>"$log" || ! sync "$log"; then
            echo "logging $file failed" >"$state.failed"
            break
        fi
        index=$((index + 1))
    done
    rm -f "$state.running"
}

start() {
    case $1 in '' | *[!0-9]* | 0) echo "usage: fbg-workload start [KIB]" >&2; exit 2 ;; esac
    if [ -e "$state.running" ]; then
        echo "fbg-workload is running already" >&2
        exit 1
    fi
    mkdir -p "$data" || exit 1
    rm -f "$state.stop" "$state.failed"
    # Marked before the writer starts, so that a stop right after this start waits for it.
    touch "$state.running"
    # No pipe of ours stays open in the writer: guest-exec reports a command done only when its pipes close.
    "$0" run "$1" </dev/null >/dev/null 2>&1 &
    echo started
}

stop() {
    if [ -e "$state.running" ]; then
        touch "$state.stop"
        # A file takes well under a second even under TCG: after 60 s the guest is stuck (or frozen).
        if ! timeout 60 sh -c "while [ -e $state.running ]; do usleep 20000; done"; then
            echo "fbg-workload did not stop within 60 s" >&2
            exit 1
        fi
    fi
    echo "stopped $(logged)"
}

wait_logged() {
    case $1 in '' | *[!0-9]*) echo "usage: fbg-workload wait N" >&2; exit 2 ;; esac
    polls=0
    while [ "$(logged)" -lt "$1" ]; do
        if [ ! -e "$state.running" ] || [ "$polls" -ge 1200 ]; then
            echo "fbg-workload logged $(logged) of $1 files in $((polls / 20)) s: $(status)" >&2
            exit 1
        fi
        usleep 50000
        polls=$((polls + 1))
    done
    echo "logged $(logged)"
}

status() {
    if [ -f "$state.failed" ]; then
        echo "failed $(logged): $(cat "$state.failed")"
    elif [ -e "$state.running" ]; then
        echo "running $(logged)"
    else
        echo "stopped $(logged)"
    fi
}

verify() {
    lines=$(logged)
    # A last line without its newline was being written when the copy was taken: it vouches for nothing.
    if [ "$lines" -gt 0 ] && [ -n "$(tail -c 1 "$log")" ]; then
        lines=$((lines - 1))
    fi
    if [ "$lines" -eq 0 ] || head -n "$lines" "$log" | sha256sum -c -s; then
        echo "verified $lines"
    else
        head -n "$lines" "$log" | sha256sum -c 2>&1 | grep -v ': OK$'
        exit 1
    fi
}

case ${1:-} in
    start) start "${2:-64}" ;;
    run) write_files "$2" ;;
    stop) stop ;;
    status) status ;;
    wait) wait_logged "${2:-}" ;;
    verify) verify ;;
    *) echo "usage: fbg-workload start [KIB] | stop | status | wait N | verify" >&2; exit 2 ;;
esac
