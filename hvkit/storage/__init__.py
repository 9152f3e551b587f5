"""Storage: disk backends, block-file volumes and token-checked I/O.

Block files: ``superblock`` (geometry), ``metablock`` (checksummed 4 KiB
metadata blocks), ``bitmap``, ``blockmap`` (descriptors and pointer
blocks), ``journal`` (redo log), ``writepath`` (batched scatter-gather
writes), ``volume``, ``vdisk`` (a disk as a ``BlockBackend``), ``check``
(check and repair), ``imageio`` (raw image import and export), ``locking``
(one writer per volume), ``cli`` (``hvkit disk``). Fault injection and crash
trials: ``faults``, ``crashtest``. Token-checked I/O: ``tokens`` (the I/O
control part), ``guard`` (the storage part and ``GuardedBackend``).
"""
