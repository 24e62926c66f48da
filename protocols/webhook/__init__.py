"""Webhooks out: room events POSTed, signed, in room order, to the URLs staff register."""
