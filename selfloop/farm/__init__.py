"""Where work runs: the engines that run units on pinned local workers, a Dask
cluster or in the master (``engines``), a worker process's setup
(``worker``), the training units (``units``) and learning-curve units
(``curves``) they run."""
