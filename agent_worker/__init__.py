"""agent_worker package."""
