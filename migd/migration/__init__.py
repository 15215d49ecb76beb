"""Save and restore jobs: the engine (settings, status machine, events, orchestration) and the
file format (mapped_ram/)."""
