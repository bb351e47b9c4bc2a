"""Rendering only, no decisions: the terminal (rich) progress and run summary, the Markdown of Prefect artifacts,
the optimization report's Markdown and its charts (Markdown and HTML)."""
