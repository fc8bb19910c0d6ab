"""What the tests share: the pytest plugin that starts the session's servers, and helpers by role."""
