"""The MQTT protocol server: devices publish into rooms and read the room's stream."""
