"""Browsers: the pages, the JSON API, the chat and dashboard sockets, the admin."""
