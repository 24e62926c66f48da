"""One Channels consumer per scope type: thin translators between protocol and room events."""
