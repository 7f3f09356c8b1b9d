"""An OpenAI-compatible server over the runtime: ``ipcv-export serve``.

``protocol`` (the chat-completions wire format and its validation), ``images`` (data: URLs,
optional http(s) fetching, size limits), ``engine`` (bounded queue, batching worker,
per-request stops), ``app`` (the FastAPI routes). Imports fastapi only when used.
"""
