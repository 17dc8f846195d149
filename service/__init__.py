"""memfit service: the FastAPI front end, the live engine and the embedded update runner."""
