"""taildiff's Ray glue: stages that read and write artifacts and place work on a Ray cluster.

Importing this package imports nothing heavy; each stage module imports ray itself.
"""
