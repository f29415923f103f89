"""splitleak reports."""
