"""Django middleware for the api role: cookies are ``Secure`` whenever the request came over TLS.

The admin's session and CSRF cookies are the only cookies the system sets. Over TLS (the gateway says so with
its own ``X-Forwarded-Proto``, ``SECURE_PROXY_SSL_HEADER``) they get the ``Secure`` flag, so a browser never
sends them over plain HTTP; over plain HTTP (``make run`` on 127.0.0.1) they work as before. Static
``SESSION_COOKIE_SECURE`` would break the plain-HTTP dev loop or leave TLS deployments unflagged.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse


class SecureCookiesOverTlsMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.is_secure():
            for morsel in response.cookies.values():
                morsel["secure"] = True
        return response


class SyncChainMiddleware:
    """Last in ``MIDDLEWARE``, sync only: under ASGI (daphne, the api role) Django then runs every middleware
    above it as plain sync calls in one worker thread. Without it, each ``MiddlewareMixin`` runs in async mode
    and hops from the event loop to a thread and back for each of its ``process_request``/``process_response``
    (~14 hops per request with our list; py-spy of a history page through the gateway: 30-40 % of the api's
    busy time in asgiref's hops). The view itself is sync either way (one hop). Side effects: none."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)
