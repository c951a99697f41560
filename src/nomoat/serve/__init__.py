"""The OpenAI-compatible server over the generation engine: `create_app(engine, settings)` in `nomoat.serve.app`.

`app` owns the routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/v1/adapters`, `/health`,
`/metrics`, the static studio in `web/`), `protocol` the wire format, `convert` the mapping to and from engine
requests, `adapters` which adapters a request's `model` selects, and `errors`, `metrics`, `middleware` the rest.
"""
