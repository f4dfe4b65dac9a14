"""The CPU backend: plain torch, the numerical reference for every other backend."""
