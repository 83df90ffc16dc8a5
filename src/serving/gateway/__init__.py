"""The gateway: two front doors over one core."""
