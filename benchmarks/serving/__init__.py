"""Online serving benchmarks: real `plait serve` processes driven over HTTP."""
