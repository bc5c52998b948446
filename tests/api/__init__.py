"""Tests of the HTTP API through FastAPI's TestClient and a real uvicorn server."""
