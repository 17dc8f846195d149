"""memfit workers: the update pipeline (plain functions) and the Celery transport of the distributed mode."""
