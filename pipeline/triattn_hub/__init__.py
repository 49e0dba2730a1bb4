"""triattn-hub: calibrate, publish and fetch TriAttention Q-center statistics."""

__version__ = "0.1.0"
