"""`muestra serve`: an OpenAI-compatible server over the engine (see `app.py`, `service.py`)."""
