"""REST API v1 (api/): real Redis and FerretDB behind the views, in process or in real api processes."""
