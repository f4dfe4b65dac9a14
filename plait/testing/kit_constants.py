"""Shapes the backend kit's checks share."""

NUM_LAYERS = 2
LAYER = 1  # check the second layer so a backend that ignores layer_id fails
