"""Tests of what ships: packaging, Dockerfiles and compose, the README, example configs."""
