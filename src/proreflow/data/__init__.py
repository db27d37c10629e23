"""Data sources: built-in 2-D point clouds and user point files."""
