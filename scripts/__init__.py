"""Operational scripts: licence check, the local stack (make up/down)."""
