"""The test suite; its folders mirror the packages (retrieval, indexer, api) plus deploy and web."""
