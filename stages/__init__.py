"""Build side: one module per DVC stage (`python -m stages.<step> <id>`)."""
