"""What a person sees of a run: the live dashboard (``dashboard``), the plain
log (``plain``), a run's history read back from its events (``history``) and
figures (``figures``)."""
