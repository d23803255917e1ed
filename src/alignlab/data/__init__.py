"""Data: reading files and datasets, preference-pair formats, tokenization and collation."""
