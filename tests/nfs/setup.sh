#!/bin/sh
# Install what the NFS lane of tests/test_failover.py needs (see /work/shared/nfs/README.md):
# nfs-ganesha (userspace NFS server) + rpcbind, libnfs + fuse3 for the nfsfuse.py bridge, and the
# Python bindings.  The default test run never installs anything: without these the lane is
# skipped with the reason.  Run as root:  sh tests/nfs/setup.sh [PYTHON]
set -eu
HERE=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${1:-$HERE/.venv/bin/python}
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-dev fuse3 \
    build-essential pkg-config swig
"$PYTHON" -m pip install libnfs mfusepy
"$PYTHON" -c "import libnfs, mfusepy; print('nfs lane ready')"
