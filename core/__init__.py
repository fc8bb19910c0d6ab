"""The bottom layer every role stands on (docs/architecture.md, "Layers"; docs/adr/0033).

``documents`` (the MongoDB domain model), ``keys`` (every Redis key and which Redis it lives on), ``bus``
and ``clients`` (the Redis clients of the bus and of coordination), ``entries`` (the stream entry format),
``tokens``, ``revocation`` and ``identity`` (who a request is), ``errors`` (the domain error hierarchy and
``error_body``), ``values`` and ``closecodes``, ``registry`` and ``roles`` (how a process joins the system).
Nothing here imports ``storage``, ``messaging``, ``api``, ``gateway`` or ``chatstream_site`` (import-linter).
"""
