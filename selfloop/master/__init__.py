"""The master: the loop over rounds (``trainer``), the population and its outer
steps (``population``), PBT (``pbt``), the divergence guard (``guard``), and a
session's budget and stop requests (``session``)."""
