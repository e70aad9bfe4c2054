"""Kettle's data: the store, import/export formats, text corpora."""
