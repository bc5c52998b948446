"""Tests of the clipsearch command, run in a subprocess or through its main()."""
