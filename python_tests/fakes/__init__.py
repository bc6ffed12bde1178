"""Test doubles of optional third-party modules (imported as ``fakes.X``)."""
