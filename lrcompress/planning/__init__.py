"""Planning: which layers, at which rank, under which budget (parameters, energy, latency)."""
