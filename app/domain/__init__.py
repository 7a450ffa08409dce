"""The job lifecycle and scheduling rules: plain Python that knows nothing of Flask or Celery."""
