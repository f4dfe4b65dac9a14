"""A toy Plait backend: device ``toy`` runs the torch reference attention on the CPU."""
