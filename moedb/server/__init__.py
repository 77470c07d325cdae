"""``moedb serve``: the HTTP service over one moedb file (extra ``server``: FastAPI + uvicorn).

:func:`create_app` builds the ASGI app (REST under ``/v1``, OpenAI-compatible ``/v1/models``,
``/v1/chat/completions`` and ``/v1/embeddings``, the dashboard at ``/``) for ``uvicorn`` or for mounting
in an existing ASGI stack. Modules: :mod:`.app` (wiring, bearer key, body limit), :mod:`.pool` (the open
``Database`` objects), :mod:`.rest`, :mod:`.openai_compat`, :mod:`.schemas` (request bodies),
:mod:`.errors` (exceptions to JSON errors), :mod:`.jsonout` (JSON as the CLI writes it).
"""
from .app import create_app

__all__ = ["create_app"]
