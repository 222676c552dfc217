"""One module per event kind: each turns one kind of sensor event into process-model updates and findings."""
