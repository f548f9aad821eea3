"""Typer shims over the library modules. Nothing heavy is imported at module top."""
