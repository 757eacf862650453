"""Serving an MM1.5 model: a batching engine, an OpenAI-compatible HTTP API, a web page and a terminal chat.

* ``engine``: a background thread that gathers concurrent requests into left-padded batches and
  streams every row's text back through the request's own queue.
* ``conversation`` and ``media``: chat turns -> one prompt with ``<image>`` placeholders; image URLs
  (base64 data, and when allowed remote or local files) -> decoded images, under the size limits.
* ``protocol`` and ``api``: the OpenAI chat-completions schemas and the FastAPI app
  (``create_app(engine, settings)``); ``server`` runs it with uvicorn.
* ``terminal``: ``mm15 chat``, one-shot or interactive, boxes and points drawn on the image.
"""
