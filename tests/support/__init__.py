"""Helpers shared by the tests: the busybox test image and a real service process."""
