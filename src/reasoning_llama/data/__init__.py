"""Data sources, validation, preparation, packing, batches and prefetching; the built-in tasks are in `tasks/`."""
