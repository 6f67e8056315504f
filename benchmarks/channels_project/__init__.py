"""The Channels project ``_workers_channels.py`` serves: a 20 ms query per websocket message."""
