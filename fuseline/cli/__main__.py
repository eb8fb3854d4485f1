"""`python -m fuseline.cli ...`: the `fuseline` command."""

from fuseline.cli import app

app()
