"""Server-Sent Events: a read-only stream of a room, for curl, dashboards and pages."""
