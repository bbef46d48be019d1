"""Data sources, validation, packing and batches; see synthetic.py for the built-in tasks."""
