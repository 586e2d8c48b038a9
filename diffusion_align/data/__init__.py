"""Preference pairs: loading, decoding, augmentation and sharded sampling (pairs), parquet shards, DCPO captions."""
