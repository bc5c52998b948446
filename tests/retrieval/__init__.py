"""Tests of the core library, mirroring retrieval's sub-packages."""
