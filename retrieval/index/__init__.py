"""FAISS shards: index kinds, one shard on disk, the shard set searched, GPU placement."""
