"""splitleak defenses."""
