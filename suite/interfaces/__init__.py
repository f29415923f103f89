"""What plug-ins implement: threat models (what an adversary observes), attacks and defences."""
