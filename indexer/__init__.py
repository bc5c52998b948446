"""The offline indexer: the clipsearch command and the jobs it runs under the writer's lock."""
