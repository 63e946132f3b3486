"""Failure drills with workers in Linux network namespaces (root only): ``python -m tests.netns.run``."""
