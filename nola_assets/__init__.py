"""Dagster asset graph around nola_core: thin wiring, artifact storage and metadata."""
