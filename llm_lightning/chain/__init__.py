"""What `compress` needs besides the entry point: the checks run on every stage before the first
starts, and the per-stage record that decides what is done, stale or resumable."""
