"""Protocol servers for protocols that are not HTTP/WebSocket (MQTT, Telegram)."""
