"""The static controller: pushes mirror, rate-limit and enforcement flows."""
