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

