"""Django's ASGI handler for the api role, with the request's sync work in one thread hop.

Django's own ``ASGIHandler`` loads the middleware chain in async mode: with every middleware (and every view)
sync, a request then goes from the event loop to a worker thread for the chain, back to the loop for the
handler's async core (``async_to_sync``), and into the thread again for the view. Here the chain is loaded in
sync mode, as under WSGI, and the whole of it (middleware, URL resolution, view) runs in one
``sync_to_async`` call on the request's thread-sensitive thread (a thread per request, as Django gives it: a slow
store read holds one request, not the instance). Reading the body, the signals and sending the response stay
Django's. Measured against Django's handler on the same server, request by request in turn
(``bench/read_paths.py --api-ab``, docs/benchmarks.md, issue 13 session 7): latest page p50 5.1 -> 4.6 ms.
"""

from __future__ import annotations

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase


class ApiHandler(ASGIHandler):
    def __init__(self) -> None:  # ASGIHandler.__init__ but with the chain loaded in sync mode
        self.load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)
