"""Celery workers: they claim admitted jobs, run them through an executor, and report back."""
