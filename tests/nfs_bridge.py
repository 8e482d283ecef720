"""Mount an NFS export with /work/shared/nfs/nfsfuse.py's bridge, FUSE's ``hard_remove`` on.

``python tests/nfs_bridge.py NFSFUSE_PY NFS_URL MOUNTPOINT TIMEOUT``: the bridge as nfsfuse.py's own
``__main__`` runs it, plus one mount option.  Without ``hard_remove`` the FUSE kernel module hides a
file unlinked while open under ``.fuse_hidden<hex>`` instead of removing it; a kernel NFS client does
the same as ``.nfs<hex>``, which filelock's strict lock recognises in its claims folder, but a
``.fuse_hidden`` name there makes it refuse the lock as damaged.  With ``hard_remove`` the unlink
reaches the server at once, and a process still reading the file gets ESTALE, as a process on
another NFS client would: the lane stays a test of NFS behaviour, not of this FUSE detail.
"""
import importlib.util
import sys


def main(argv: list[str]) -> None:
    bridge, url, mnt, timeout = argv[0], argv[1], argv[2], float(argv[3])
    spec = importlib.util.spec_from_file_location("nfsfuse", bridge)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FUSE(module.NFSBridge(url), mnt, foreground=True, nothreads=True, allow_other=True,
                attr_timeout=timeout, entry_timeout=timeout, negative_timeout=timeout, use_ino=True,
                hard_remove=True)


if __name__ == "__main__":
    main(sys.argv[1:])
