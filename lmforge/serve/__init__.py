"""`lmforge serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

`protocol` holds the request bodies, `errors` the OpenAI error shape, `app` the routes
(`create_app(ServerState(...))`); `lmforge/cli/serve.py` runs it with uvicorn.
"""
