"""What a run keeps on disk.

- ``h5tree``: pytrees in h5py groups, one checksummed dataset per leaf (no selfloop imports);
- ``rundir``: ``RunDir``, which names every path under a run directory, and the master's lock;
- ``checkpoint``: a whole run's state, written crash-safe, read back checked, resumable;
- ``optimizer``: optimizer files, and ``load_optimizer`` (needs only the lopt and ``h5tree``).
"""
