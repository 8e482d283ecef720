#!/bin/sh
# The system (Debian) packages the test suite uses, installed when the suite runs as root on a
# machine whose package manager works.  `python3 dev.py test` (hence .ci/run) runs this first;
# by hand:  sh tests/setup-system.sh        (MAILQ_NO_SYSTEM_INSTALL=1 makes dev.py skip it)
#
# To add a package: append one line to PACKAGES below, "name  # which tests need it and why".
#
# Besides PACKAGES, Exim is unpacked for tests/test_exim.py (see unpack_exim below).
#
# Tests that need a package still check for it and skip with the reason where it is missing (a
# developer's machine without root).  The last line this script prints is
#   installed: PKG PKG ...      (those of PACKAGES that are installed now)
# and dev.py, when it runs as root, passes that list on to the tests (MAILQ_SYSTEM_PACKAGES): a
# test whose packages are all in it must run, so a skip there is a failure (tests/support.py
# `skip_unless_ready`).  Idempotent: when everything is present it costs one dpkg-query and no
# network.  Exit status 0 when every package is installed, 3 when some could not be (the lines
# before say why: not root, no apt, no network, a package this Debian lacks).
set -u

PACKAGES='
nfs-ganesha        # tests/test_nfs.py: the NFS server every simulated host mounts (issue 17)
nfs-ganesha-vfs    # tests/test_nfs.py: ganesha exports a local folder through its VFS backend
rpcbind            # tests/test_nfs.py: ganesha 4.3 refuses to start without a portmapper
libnfs-dev         # tests/test_nfs.py: nfsfuse.py speaks NFSv3 through libnfs (pip libnfs builds on it)
fuse3              # tests/test_nfs.py: nfsfuse.py mounts the export once per host (libfuse3)
prometheus         # tests/test_metrics.py: promtool checks etc/prometheus/mailq-alerts.yml
postfix            # tests/test_aliases.py: the file `mailqctl aliases` writes goes through postalias (issue 12)
'

wanted=$(printf '%s\n' "$PACKAGES" | sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d')
say() { echo "system packages: $*"; }

installed_now() {
    out=""
    if command -v dpkg-query >/dev/null 2>&1; then
        for pkg in $wanted; do
            [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] && out="$out $pkg"
        done
    fi
    echo "$out"
}

# Exim for tests/test_exim.py: Debian's exim4-daemon-light conflicts with postfix (above), so it is
# not installed but unpacked (dpkg -x) into EXIM_ROOT, once, and its libraries installed.  Reported
# as "exim4-daemon-light" on the last line when that binary runs.  Costs one ldd when ready.
EXIM_ROOT=${MAILQ_EXIM_ROOT:-/var/cache/mailq-tests/exim4/root}
exim_ready() {
    [ -x "$EXIM_ROOT/usr/sbin/exim4" ] && ldd "$EXIM_ROOT/usr/sbin/exim4" >/dev/null 2>&1 && \
        ! ldd "$EXIM_ROOT/usr/sbin/exim4" 2>/dev/null | grep -q 'not found'
}
unpack_exim() {  # returns 0 when EXIM_ROOT has a usable exim4, else says why
    exim_ready && return 0
    [ -n "${MAILQ_NO_SYSTEM_INSTALL:-}" ] && { say "exim4 not unpacked: MAILQ_NO_SYSTEM_INSTALL is set"; return 1; }
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1 || \
        { say "exim4 not unpacked: needs root and apt (tests/test_exim.py skips)"; return 1; }
    mkdir -p "${EXIM_ROOT%/*}" || return 1
    (
        flock 9 || exit 1               # another run of this script may be unpacking it right now
        exim_ready && exit 0
        apt="apt-get -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0"
        work=$(mktemp -d "${EXIM_ROOT%/*}/unpack.XXXXXX") || exit 1
        trap 'rm -rf "$work"' EXIT
        log="$work/log"
        ( cd "$work" && $apt download exim4-daemon-light ) >"$log" 2>&1 || \
            { $apt update >>"$log" 2>&1; ( cd "$work" && $apt download exim4-daemon-light ) >>"$log" 2>&1; } || \
            { tail -n 3 "$log"; say "exim4 not unpacked: apt-get download failed (no route to the mirror?)"; exit 1; }
        libs=$(apt-cache depends --important exim4-daemon-light 2>/dev/null | awk '/Depends: lib/ {print $2}')
        # shellcheck disable=SC2086  # one word per package
        DEBIAN_FRONTEND=noninteractive $apt install -y --no-install-recommends $libs >>"$log" 2>&1 || \
            { tail -n 5 "$log"; say "exim4 not unpacked: its libraries did not install"; exit 1; }
        dpkg -x "$work"/exim4-daemon-light_*.deb "$work/root" && rm -rf "$EXIM_ROOT" && mv "$work/root" "$EXIM_ROOT" || \
            { say "exim4 not unpacked: dpkg -x failed"; exit 1; }
        say "unpacked exim4-daemon-light into $EXIM_ROOT"
    ) 9>"${EXIM_ROOT%/*}/.lock" || return 1
    exim_ready
}

finish() {      # finish STATUS [WHY]: the reason (if any), then the machine-readable last line
    [ -n "${2:-}" ] && say "not all installed: $2"
    status=$1
    unpack_exim || status=3
    exim=""
    exim_ready && exim=" exim4-daemon-light"
    echo "installed:$(installed_now)$exim"
    exit "$status"
}

have=$(installed_now)
missing=""
for pkg in $wanted; do
    case " $have " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
done
[ -z "$missing" ] && { say "ready (all $(echo $wanted | wc -w) present)"; finish 0; }

[ -n "${MAILQ_NO_SYSTEM_INSTALL:-}" ] && finish 3 "MAILQ_NO_SYSTEM_INSTALL is set; missing:$missing"
command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 || \
    finish 3 "no apt-get/dpkg on this machine; missing:$missing (the tests needing them skip)"
[ "$(id -u)" = 0 ] || finish 3 "not root; missing:$missing (run this script as root)"

export DEBIAN_FRONTEND=noninteractive
# Another apt run (a concurrent test run, unattended-upgrades) may hold the dpkg lock: wait for it.
APT="apt-get -q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0"
log=$(mktemp /tmp/mailq-apt.XXXXXX)
trap 'rm -f "$log"' EXIT
started=$(date +%s)
say "installing:$missing"
# Fetch the index when it was never fetched (a fresh container) or is older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 2>/dev/null | head -n 1)" ]; then
    $APT update >"$log" 2>&1 || { tail -n 5 "$log"; finish 3 "apt-get update failed (no route to the mirror?)"; }
fi
# A package this Debian does not have is reported and left out; the rest are installed.
installable=""
unavailable=""
for pkg in $missing; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then installable="$installable $pkg"; else unavailable="$unavailable $pkg"; fi
done
if [ -n "$installable" ]; then
    # shellcheck disable=SC2086  # one word per package
    if ! $APT install -y --no-install-recommends $installable >"$log" 2>&1; then
        # A day-old index may name versions the mirror no longer has: refresh once and retry.
        $APT update >/dev/null 2>&1
        # shellcheck disable=SC2086
        $APT install -y --no-install-recommends $installable >"$log" 2>&1 || \
            { tail -n 15 "$log"; finish 3 "apt-get install failed (above)"; }
    fi
fi
[ -n "$installable" ] && say "installed$installable in $(( $(date +%s) - started ))s"
[ -n "$unavailable" ] && finish 3 "this Debian has no package:$unavailable"
finish 0
