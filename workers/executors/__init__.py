"""Executors behind one interface (see base.py): local processes, Kubernetes Jobs."""
