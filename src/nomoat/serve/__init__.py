"""The OpenAI-compatible server: `create_app(engine, settings)` (see `nomoat.serve.app`)."""
