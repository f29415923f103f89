"""splitleak attacks."""
