"""voxbridge: Asterisk AudioSocket <-> realtime AI voice gateway bridge."""

__version__ = "0.1.0"
