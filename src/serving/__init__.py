"""Partner model API platform."""
