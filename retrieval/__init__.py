"""Core library of clipsearch: encoding, decoding, shards, catalog, labels and search.

It knows nothing of HTTP or the command line; it raises the domain exceptions in
`retrieval.errors`, which the API and the CLI translate in one place each.
"""
