"""Maintainer tools that write or print project files from the code: run from the repository root as
`python -m tools.<name>` (see each module's docstring). Tests check their output; tests never write files."""
