"""What the daemon knows about the host between events: the process model
(processes keyed by pid and start time, lineage, attribution, recent peers).
Nothing here decides or acts."""
