"""Where work runs: the engines that run units on pinned local workers or in
the master (``engines``), on a Dask cluster of several nodes (``cluster``), a
worker process's setup (``worker``), the training units (``units``) and
learning-curve units (``curves``) they run."""
