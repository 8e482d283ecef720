#!/bin/sh
# System packages some tests need, installed by `python3 dev.py test` when it runs as root on a
# machine with apt-get (CI does).  Elsewhere it changes nothing and says why; those tests are then
# skipped with the reason.  Add a package: one word in PACKAGES, and say which tests need it.
#
#   postfix   tests/test_aliases.py: the alias file `mailqctl aliases` writes goes through postalias
#             (installing it starts no daemon here; the tests run no Postfix service)
set -u
PACKAGES="postfix"

if [ "$(id -u)" != 0 ]; then
    echo "setup-system: not root: not installing $PACKAGES (the tests that need them are skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "setup-system: no apt-get here: not installing $PACKAGES (the tests that need them are skipped)"
    exit 0
fi
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
    exit 0
fi
echo "setup-system: installing$missing"
export DEBIAN_FRONTEND=noninteractive
# Postfix's package asks for a mail name and a configuration type: take the defaults.
if (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $missing >/dev/null); then
    echo "setup-system: installed$missing"
else
    echo "setup-system: apt-get could not install$missing (the tests that need them are skipped)"
fi
exit 0
