"""The worker side of `benchmarks.peers.peers`: one module per engine, standard library only in
`common`. Run as `python -m benchmarks.peers.workers.run_<engine>` from the repository root."""
