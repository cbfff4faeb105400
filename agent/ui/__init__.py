"""The "Trusted Devices" web page and desktop notifications.

Importing this package is cheap: the web stack (Starlette, Hypercorn, Jinja2) is imported by
`agent.ui.app`, which `agent.ui.server` loads only when the first browser connects, and D-Bus
(jeepney) only when a notification is sent. The page talks to the agent through the
`agent.ui.backend.UiBackend` protocol alone.
"""
