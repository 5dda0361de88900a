"""Command-line tools beyond training: visualisation, conversion, analysis."""
